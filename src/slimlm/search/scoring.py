"""How ``slimlm.search`` scores a candidate: held-out KD and LM loss without training
(``held_out_losses``, against teacher states computed once by ``teacher_states``), and the
same short distillation for every re-ranked candidate (``short_distill``)."""
from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import replace

import torch

from slimlm.architectures import lm_head
from slimlm.data import TokenBlocks
from slimlm.losses import fused_linear_kl_div_loss, last_hidden_state
from slimlm.search.candidates import Candidate
from slimlm.surgery.apply import prune


def teacher_states(model, blocks: TokenBlocks, batch_size: int) -> list[torch.Tensor]:
    """The model's last hidden states on ``blocks``, one (B, T, H) tensor per batch of ``batch_size``."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return [last_hidden_state(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for batch in blocks.batches(batch_size)]


def held_out_losses(student, blocks: TokenBlocks, states: list[torch.Tensor], teacher_head, batch_size: int,
                    distillation_config) -> tuple[float, float]:
    """(KD, LM) loss per valid next-token position of ``student`` on ``blocks``: τ²·D(P‖Q)
    against the teacher's logits, formed from its last hidden ``states`` (``teacher_states``,
    same ``batch_size``) and ``teacher_head`` inside the fused loss (temperature and β of
    ``distillation_config``), and next-token cross-entropy. One student forward per batch."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    head = lm_head(student)
    kd = lm = 0.0
    count = 0
    with torch.no_grad():
        for batch, teacher_hidden in zip(blocks.batches(batch_size), states):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            labels = ids.masked_fill(mask == 0, -100)[:, 1:]
            hidden = last_hidden_state(student, ids, mask)
            terms = fused_linear_kl_div_loss(
                hidden[:, :-1], head, teacher_hidden[:, :-1].to(device), teacher_head, labels=labels,
                temperature=distillation_config.temperature, beta=distillation_config.beta, reduction="sum",
                kd_weight=1.0, ce_weight=1.0, return_terms=True)
            kd += float(terms["kd"])
            lm += float(terms["ce"])
            count += int((labels != -100).sum())
    student.train(was_training)
    return kd / max(count, 1), lm / max(count, 1)


def short_distill(model, scores, candidate: Candidate, train: TokenBlocks, tokens: int | None, batch_size: int,
                  seed: int, training_args, distillation_config, reconstruct=None):
    """``candidate`` pruned from ``model`` and distilled from it on ``train`` for ``tokens``
    (rounded up to whole batches; default: one pass over ``train``), seeded by ``seed``, on
    the ``DistillationTrainer`` (pruned with ``reconstruct``'s compensation when given); the
    teacher's requires_grad flags and mode are restored."""
    from slimlm.distill.trainer import DistillationTrainer

    torch.manual_seed(seed)
    student = prune(model, scores, candidate.target(), inplace=False, reconstruct=reconstruct)
    student.requires_grad_(True)
    student.train()
    steps = short_distill_steps(tokens, len(train), train.seq_len, batch_size)
    items = [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
             for ids, mask in zip(train.input_ids, train.attention_mask)]
    teacher_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    teacher_training = model.training
    with tempfile.TemporaryDirectory(prefix="slimlm-search-") as scratch:
        args = short_distill_arguments(training_args, scratch, steps, batch_size, seed)
        trainer = DistillationTrainer(model=student, teacher_model=model, args=args, train_dataset=items,
                                      distillation_config=copy.copy(distillation_config))
        try:
            trainer.train()
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(teacher_flags[name])
            model.train(teacher_training)
    return student.eval()


def short_distill_steps(tokens: int | None, train_blocks: int, seq_len: int, batch_size: int) -> int:
    """Optimizer steps of a short distillation of ``tokens`` (rounded up to whole blocks and
    batches; None: one pass over the ``train_blocks``), at least one."""
    blocks = math.ceil(tokens / seq_len) if tokens else train_blocks
    return max(1, math.ceil(blocks / batch_size))


def short_distill_arguments(training_args, scratch: str, steps: int, batch_size: int, seed: int):
    """``training_args`` (a ``TrainingArguments``, or the distillation's own defaults:
    ``slimlm.distill.training.training_arguments``) with what makes every re-ranked candidate's
    run the same: ``steps``, global batch size (split over ``WORLD_SIZE`` processes) and seed
    (data order too), no checkpoints, no reporting, no progress bar, in ``scratch``. Over the
    distillation's defaults it also logs every tenth step and warms up for 5% of the steps
    rounded down (warmup's first step has learning rate 0, so 1 step must still train)."""
    from slimlm.distill.training import training_arguments

    # Under a launcher the Trainer splits each batch over the processes: ``batch_size`` stays
    # the global batch, and the run is one process's (the loss is normalised globally).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if training_args is not None:
        return replace(training_args, output_dir=scratch, max_steps=steps, save_strategy="no", seed=seed,
                       data_seed=seed, per_device_train_batch_size=batch_size // world, report_to="none",
                       disable_tqdm=True)
    overrides = ["--max_steps", str(steps), "--save_strategy", "no", "--data_seed", str(seed),
                 "--warmup_steps", str(int(0.05 * steps)), "--logging_steps", str(max(1, steps // 10)),
                 "--disable_tqdm", "true"]
    return training_arguments(overrides, output_dir=scratch, batch_size=batch_size // world, seed=seed)
