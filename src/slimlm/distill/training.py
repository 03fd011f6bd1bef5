"""What a distillation run trains on and with: Trainer items from token blocks (classic text
with synthetic text mixed in), ``TrainingArguments`` from command-line style flags over
slimlm's defaults, the tokens one optimizer step sees, and a wall-time cap."""
from __future__ import annotations

import os
import time

import torch

from slimlm.errors import InputError


def training_items(blocks) -> list[dict]:
    """Trainer items from TokenBlocks: labels = input_ids with -100 on padding."""
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            for ids, mask in zip(blocks.input_ids, blocks.attention_mask)]


def training_set(classic: list, synthetic: list | None, mix_fraction: float, *, seed: int = 0) -> list:
    """All ``classic`` items, joined by ``synthetic`` ones up to ``mix_fraction`` of the total
    (fewer when there are not enough of them; none is repeated), shuffled with ``seed``.
    ``mix_fraction`` 1: the synthetic items alone; 0 or ``synthetic`` None: ``classic`` as it is."""
    from slimlm.distill.generate import mix

    if synthetic is None or mix_fraction <= 0:
        return classic
    wanted = len(classic) * mix_fraction / (1.0 - mix_fraction) if mix_fraction < 1 else len(synthetic)
    num_synthetic = min(len(synthetic), round(wanted))
    total = len(classic) + num_synthetic if mix_fraction < 1 else num_synthetic
    return mix(classic, synthetic, synthetic_fraction=num_synthetic / total, num_samples=total, seed=seed)


def tokens_per_step(args, seq_len: int) -> int:
    """Tokens one optimizer step trains on: batch · accumulation · world size · seq_len."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * seq_len


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def training_arguments(flags=(), *, output_dir: str, batch_size: int = 8, learning_rate: float = 1e-4,
                       seed: int = 0):
    """``TrainingArguments`` from command-line style ``flags``, over slimlm's defaults (cosine
    schedule, 5% warmup, a log every step, a checkpoint every 50 steps, no reporting);
    on a machine without CUDA, ``--use_cpu`` (and gloo under torchrun). InputError for a flag
    TrainingArguments does not know."""
    from transformers import HfArgumentParser, TrainingArguments

    defaults = ["--output_dir", output_dir, "--per_device_train_batch_size", str(batch_size),
                "--learning_rate", str(learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                "--weight_decay", "0.0", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "50",
                "--save_total_limit", "1", "--report_to", "none", "--seed", str(seed), "--max_grad_norm", "1.0",
                "--dataloader_num_workers", "0"]
    if not torch.cuda.is_available():
        # Without these a CPU process under torchrun/accelerate trains alone (world size 1).
        defaults += ["--use_cpu", "true"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults += ["--ddp_backend", "gloo"]
    parser = HfArgumentParser(TrainingArguments)
    args, remaining = parser.parse_args_into_dataclasses(args=defaults + list(flags), return_remaining_strings=True)
    if remaining:
        raise InputError(f"unknown option(s) for distill: {' '.join(remaining)} (not a slimlm or TrainingArguments flag)")
    if args.bf16 and str(args.device) == "cpu" and not cpu_has_bf16():
        raise InputError("--bf16 on this CPU would be slower than float32: it has no AVX512-BF16 or AMX instructions")
    return args


def time_budget_callback(seconds: float):
    """A TrainerCallback that stops training (and saves) once ``seconds`` of wall time have
    passed since training began (transformers is imported only when distilling)."""
    from transformers import TrainerCallback

    class TimeBudgetCallback(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds:
                control.should_training_stop = True
                control.should_save = True
            return control

    return TimeBudgetCallback()


def heldout_eval_callback(sets: dict, every: int, *, batch_size: int = 8, log=None):
    """A TrainerCallback that, every ``every`` optimizer steps and after the last, scores the
    student on each held-out ``TokenBlocks`` of ``sets`` ({name: blocks}) and logs
    ``<name>_nll`` and ``<name>_ppl`` into the Trainer's ``log_history`` (so the report draws
    them along the loss curve). The model is put back in training mode afterwards; scoring
    uses no randomness, so it changes nothing about the training. ``log``: a function given one
    line per evaluation."""
    import math as _math

    from transformers import TrainerCallback

    from slimlm.evaluate import perplexity

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"eval steps must be a positive int, got {every!r}")

    class HeldoutEvalCallback(TrainerCallback):
        def _score(self, state, model):
            if model is None or any(e.get("step") == state.global_step and any(k.endswith("_nll") for k in e)
                                    for e in state.log_history):
                return
            training = model.training
            entry = {"step": state.global_step}
            for name, blocks in sets.items():
                nll = perplexity(model, blocks, batch_size=batch_size, progress=False)["nll"]
                entry[f"{name}_nll"] = round(nll, 5)
                entry[f"{name}_ppl"] = round(_math.exp(nll), 4)
            model.train(training)
            state.log_history.append(entry)
            if log is not None and state.is_world_process_zero:
                log(f"[distill] step {state.global_step}: held-out perplexity "
                    + ", ".join(f"{name} {entry[f'{name}_ppl']:.2f}" for name in sets))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps or control.should_training_stop:
                self._score(state, model)
            return control

    return HeldoutEvalCallback()
