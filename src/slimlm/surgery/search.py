"""``search``: the student shape that distills best at a budget (Minitron's architecture search).

1. Enumerate every legal uniform shape meeting the budget (``slimlm.surgery.candidates``) and
   keep the ``top_n`` closest to it.
2. Zero-shot rank: prune each in memory and score it on a held-out split of ``data``, no
   training: KD loss against the teacher's logits through the fused loss (the teacher's last
   hidden states on the split computed once, reused for every candidate) and LM loss, both
   per valid token. One student forward pass over the split per candidate.
3. Re-rank: the ``top_k`` best get the same short distillation (``DistillationTrainer``: same
   tokens, seed and schedule) and are ranked by held-out KD loss after it; the winner's
   distilled student is returned (and kept in ``out/winner``) so a full distillation can
   continue from it.

With ``out``, every finished candidate is recorded in ``out/search.json`` as it finishes,
and a rerun with the same inputs reads those back instead of recomputing them.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

from slimlm.architectures import lm_head, model_sizes
from slimlm.data import TokenBlocks
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.scores import ImportanceScores
from slimlm.losses import fused_linear_kl_div_loss, last_hidden_state
from slimlm.surgery import search_records as records
from slimlm.surgery.apply import prune
from slimlm.surgery.candidates import Budget, Candidate, ParameterCounter, SearchSpace, enumerate_shapes, fitting, \
    resolve_dtype
from slimlm.surgery.planning import Target, count_parameters, meta_model, pruned_config
from slimlm.surgery.selection import kept_layers_for, select_units


@dataclass
class SearchResult:
    """``candidates``: every scored candidate's row (search.json's), best rank first;
    ``winner``: the first row; ``target``: the winner's ``Target`` (``prune`` takes it with the
    same scores); ``student``: the winner pruned and, when ``top_k`` > 0, short-distilled
    (None when it was finished by an earlier run and ``out`` holds no saved copy)."""

    candidates: list[dict]
    winner: dict
    target: Target
    student: object | None
    num_enumerated: int
    num_meeting: int
    phase_seconds: dict


def search(model, scores: ImportanceScores, target, data: TokenBlocks, *, out: str | os.PathLike | None = None,
           space: SearchSpace | None = None, top_n: int = 20, top_k: int = 4, held_out: float | int = 0.1,
           seed: int = 0, rerank_tokens: int | None = None, batch_size: int = 8, training_args=None,
           distillation_config=None, save_winner: bool = True, log=print) -> SearchResult:
    """Search the student shape of ``model`` (the teacher, never modified) at ``target``
    (a ``Budget``, a dict of its fields, or a ``Target`` with ``target_params``).

    ``data``: calibration ``TokenBlocks``; ``held_out`` (fraction or block count, split with
    ``seed``) is scored, the rest trains the re-ranked candidates. ``rerank_tokens``: tokens
    of each short distillation (default: one pass over the training part), in batches of
    ``batch_size`` on ``training_args`` (a ``TrainingArguments``; its max_steps, seed and
    saving are set here) with ``distillation_config`` (default: forward KL, τ = 1).
    ``top_k=0`` ranks zero-shot only. Everything is checked before any work (ValueError).
    """
    space = space or SearchSpace()
    budget = Budget.coerce(target)
    budget.check()
    space.check()
    for name, value, low in (("top_n", top_n, 1), ("top_k", top_k, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if rerank_tokens is not None and (isinstance(rerank_tokens, bool) or not isinstance(rerank_tokens, int)
                                      or rerank_tokens < 1):
        raise ValueError(f"rerank_tokens must be a positive int, got {rerank_tokens!r}")
    if top_k > top_n:
        raise ValueError(f"top_k={top_k} is larger than top_n={top_n}: only the top_n candidates are re-ranked")
    if scores is None:
        raise ValueError("search needs the model's importance scores (slimlm.estimate_importance)")
    scores.check_model(model)
    train, held = _split(data, held_out, seed)
    from slimlm.distill.trainer import DistillationConfig

    distillation_config = distillation_config or DistillationConfig()
    distillation_config.check()

    started = time.perf_counter()
    counter = ParameterCounter(model)
    dtype = resolve_dtype(budget.dtype, next(model.parameters()).dtype)
    memory_at = (budget.at_batch, budget.at_seq) if budget.at_batch and budget.at_seq else None
    shapes = enumerate_shapes(model, space, memory_at=memory_at, dtype=dtype, counter=counter)
    model_size = count_parameters(meta_model(type(model), model.config), counter.adapter)["total"]
    _, meeting = fitting(shapes, budget, model_size)
    chosen = meeting[:top_n]
    if top_k > len(chosen):
        raise ValueError(f"top_k={top_k} but only {len(chosen)} candidate(s) meet the budget "
                         f"({len(meeting)} within tolerance {budget.tolerance}); lower top_k or widen the search")
    _check_candidates(model, scores, chosen, counter)
    phases = {"enumerate": round(time.perf_counter() - started, 3)}
    log(f"[search] {len(shapes)} legal shapes in {phases['enumerate']} s, {len(meeting)} meet the budget; "
        f"scoring the {len(chosen)} closest")

    inputs = _inputs(model, scores, data, budget, space, top_n, top_k, held_out, seed, rerank_tokens, batch_size,
                     distillation_config, training_args)
    out = os.fspath(out) if out is not None else None
    finished = records.load_finished(out, inputs)
    rows = [finished.get(c.key) or records.candidate_record(c) for c in chosen]
    by_key = {c.key: c for c in chosen}

    def save_progress(winner=None):
        if out:
            records.write_record(out, inputs, rows, winner, phases)

    started = time.perf_counter()
    teacher_head = lm_head(model).detached()
    teacher_states = None
    for row in rows:
        if row["zero_shot_kd_loss"] is not None:
            log(f"[search] {row['key']}: zero-shot scored by an earlier run")
            continue
        if teacher_states is None:
            teacher_states = _hidden_states(model, held, batch_size)
        student = prune(model, scores, by_key[row["key"]].target(), inplace=False)
        row["zero_shot_kd_loss"], row["lm_loss"] = held_out_losses(student, held, teacher_states, teacher_head,
                                                                   batch_size, distillation_config)
        del student
        log(f"[search] {row['key']} ({row['params']:,} params): zero-shot KD {row['zero_shot_kd_loss']:.4f}, "
            f"LM {row['lm_loss']:.4f}")
        save_progress()
    phases["zero_shot"] = round(time.perf_counter() - started, 3)
    rows.sort(key=lambda row: (row["zero_shot_kd_loss"], row["key"]))

    started = time.perf_counter()
    student = None
    best = None
    winner_dir = os.path.join(out, records.WINNER_DIR) if out else None
    for row in rows[:top_k]:
        if row["distill_loss"] is None:
            if teacher_states is None:
                teacher_states = _hidden_states(model, held, batch_size)
            distilled = _short_distill(model, scores, by_key[row["key"]], train, rerank_tokens, batch_size, seed,
                                       training_args, distillation_config)
            row["distill_loss"], _ = held_out_losses(distilled, held, teacher_states, teacher_head, batch_size,
                                                     distillation_config)
            log(f"[search] {row['key']}: KD {row['distill_loss']:.4f} after the short distillation")
            if best is None or row["distill_loss"] < best["distill_loss"]:
                best, student = row, distilled
                if out and save_winner:
                    from slimlm.surgery.save import save_pruned

                    save_pruned(student, winner_dir, overwrite=True, record={"search_key": row["key"]})
            save_progress()
        elif best is None or row["distill_loss"] < best["distill_loss"]:
            best, student = row, None
    phases["rerank"] = round(time.perf_counter() - started, 3)

    ranked = sorted(rows[:top_k], key=lambda row: (row["distill_loss"], row["key"])) + rows[top_k:]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    winner = ranked[0]
    winner_candidate = by_key[winner["key"]]
    if student is None and top_k:
        student = _saved_winner(winner_dir, winner["key"], model)
    if top_k == 0:
        student = prune(model, scores, winner_candidate.target(), inplace=False)
    winner_target = _winner_target(winner_candidate, scores, counter)
    if out:
        records.write_record(out, inputs, ranked, winner, phases)
        records.write_results(out, ranked, winner, winner_target)
    log(f"[search] winner {winner['key']} ({winner['params']:,} params); phases (s): {phases}")
    return SearchResult(ranked, winner, winner_target, student, len(shapes), len(meeting), phases)


def _split(data, held_out, seed) -> tuple[TokenBlocks, TokenBlocks]:
    if not isinstance(data, TokenBlocks):
        raise ValueError(f"data must be TokenBlocks (slimlm.data.load_blocks), got {type(data).__name__}")
    try:
        return data.split(held_out, seed)
    except ValueError as error:
        raise ValueError(f"calibration data too small for the held-out split: {len(data)} block(s), "
                         f"held_out={held_out!r} ({error}); give more data or a smaller held_out") from None


def _check_candidates(model, scores, chosen: list[Candidate], counter: ParameterCounter) -> None:
    """Score axes and shapes, and transformers' validation of each full config, before any work."""
    before = model_sizes(model.config)
    for candidate in chosen:
        sizes = {**before, **candidate.sizes()}
        selection = select_units(scores, before, sizes, None, candidate.depth_selection)
        pruned_config(model.config, counter.adapter, sizes, selection.kept_layers)


def _inputs(model, scores, data, budget, space, top_n, top_k, held_out, seed, rerank_tokens, batch_size,
            distillation_config, training_args) -> dict:
    """What the results depend on, compared on resume."""
    digest = hashlib.sha256()
    for key in sorted(scores.scores):
        digest.update(key.encode())
        digest.update(scores.scores[key].detach().float().cpu().contiguous().numpy().tobytes())
    data_digest = hashlib.sha256(data.input_ids.numpy().tobytes() + data.attention_mask.numpy().tobytes())
    training = None
    if training_args is not None:
        training = {k: str(getattr(training_args, k)) for k in ("learning_rate", "lr_scheduler_type", "warmup_steps",
                                                                 "weight_decay", "bf16", "fp16")}
    return {"model": model_fingerprint(model), "scores": digest.hexdigest()[:16],
            "data": data_digest.hexdigest()[:16], "budget": {k: str(v) for k, v in asdict(budget).items()},
            "space": {k: str(v) for k, v in asdict(space).items()}, "top_n": top_n, "top_k": top_k,
            "held_out": held_out, "seed": seed, "rerank_tokens": rerank_tokens, "batch_size": batch_size,
            "distillation": {k: str(v) for k, v in vars(distillation_config).items()}, "training": training}


def _hidden_states(model, blocks: TokenBlocks, batch_size: int) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    with torch.no_grad():
        return [last_hidden_state(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
                for batch in blocks.batches(batch_size)]


def held_out_losses(student, blocks: TokenBlocks, teacher_states: list[torch.Tensor], teacher_head, batch_size: int,
                    distillation_config) -> tuple[float, float]:
    """(KD, LM) loss per valid next-token position of ``student`` on ``blocks``, against the
    teacher's last hidden states ``teacher_states`` (one per batch of ``batch_size``) through
    its ``teacher_head``: τ²·D(P‖Q) at the config's temperature and β, and cross-entropy."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    head = lm_head(student)
    kd = lm = 0.0
    count = 0
    with torch.no_grad():
        for batch, teacher_hidden in zip(blocks.batches(batch_size), teacher_states):
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


def _short_distill(model, scores, candidate: Candidate, train: TokenBlocks, tokens, batch_size, seed, training_args,
                   distillation_config):
    """The candidate pruned from ``model`` and distilled for ``tokens`` (default: one pass over
    ``train``); the teacher's flags and mode are restored afterwards."""
    from slimlm.distill.trainer import DistillationTrainer

    torch.manual_seed(seed)
    student = prune(model, scores, candidate.target(), inplace=False)
    student.requires_grad_(True)
    student.train()
    blocks = math.ceil(tokens / train.seq_len) if tokens else len(train)
    steps = max(1, math.ceil(blocks / batch_size))
    items = [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
             for ids, mask in zip(train.input_ids, train.attention_mask)]
    teacher_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    teacher_training = model.training
    with tempfile.TemporaryDirectory(prefix="slimlm-search-") as scratch:
        args = _training_args(training_args, scratch, steps, batch_size, seed)
        trainer = DistillationTrainer(model=student, teacher_model=model, args=args, train_dataset=items,
                                      distillation_config=copy.copy(distillation_config))
        try:
            trainer.train()
        finally:
            for name, parameter in model.named_parameters():
                parameter.requires_grad_(teacher_flags[name])
            model.train(teacher_training)
    return student.eval()


def _training_args(training_args, scratch: str, steps: int, batch_size: int, seed: int):
    from transformers import TrainingArguments

    overrides = dict(output_dir=scratch, max_steps=steps, save_strategy="no", seed=seed, data_seed=seed,
                     per_device_train_batch_size=batch_size, report_to="none", disable_tqdm=True)
    if training_args is not None:
        return replace(training_args, **overrides)
    return TrainingArguments(learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0,
                             logging_steps=max(1, steps // 10), max_grad_norm=1.0, dataloader_num_workers=0,
                             use_cpu=not torch.cuda.is_available(), **overrides)


def _saved_winner(winner_dir, key: str, model):
    """The winner's distilled student saved by an earlier run, or None."""
    from slimlm.surgery.save import RECORD_FILE

    record = os.path.join(winner_dir, RECORD_FILE) if winner_dir else None
    if not record or not os.path.isfile(record):
        return None
    import json

    with open(record, encoding="utf-8") as handle:
        if json.load(handle).get("search_key") != key:
            return None
    from slimlm.models import load_model

    return load_model(winner_dir, dtype=next(model.parameters()).dtype)


def _winner_target(candidate: Candidate, scores, counter: ParameterCounter) -> Target:
    """The winner's sizes, its dropped layers named (so the Target needs no depth choice)."""
    target = candidate.target()
    num_layers = counter.before["num_layers"]
    if candidate.num_layers < num_layers:
        kept = kept_layers_for(scores, num_layers, candidate.num_layers, candidate.depth_selection)
        target = replace(target, num_layers=None, drop_layers=[i for i in range(num_layers) if i not in kept])
    return target
