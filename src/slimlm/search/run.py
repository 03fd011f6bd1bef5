"""``search``: the student shape that distills best at a budget (Minitron's architecture search).

1. Enumerate every legal uniform shape (``slimlm.search.candidates``), keep those meeting
   the budget (``slimlm.search.budget``) and of them the ``top_n`` closest to it.
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

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) rank r scores the zero-shot
candidates ``rows[r::world]`` and the losses are gathered before ranking; the short
distillations run on the Trainer across all ranks with ``batch_size`` as the global batch
(``batch_size / world`` per process), so the ranking is one process's. Only rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace

from slimlm.architectures import lm_head, model_sizes
from slimlm.data import TokenBlocks
from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.scores import ImportanceScores
from slimlm.search import records
from slimlm.search.budget import Budget, fitting, resolve_dtype
from slimlm.search.candidates import Candidate, ParameterCounter, SearchSpace, enumerate_shapes
from slimlm.search.scoring import held_out_losses, short_distill, teacher_states
from slimlm.surgery.apply import prune
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
           space: SearchSpace | dict | None = None, top_n: int = 20, top_k: int = 4, held_out: float | int = 0.1,
           seed: int = 0, rerank_tokens: int | None = None, batch_size: int = 8, training_args=None,
           distillation_config=None, save_winner: bool = True, reconstruct=None, log=print) -> SearchResult:
    """Search the student shape of ``model`` (the teacher, never modified) at ``target``
    (a ``Budget``, a dict of its fields, or a ``Target`` with ``target_params``) within
    ``space`` (a ``SearchSpace`` or a dict of its fields; default: Model Optimizer's floors).

    ``data``: calibration ``TokenBlocks``; ``held_out`` (fraction or block count, split with
    ``seed``) is scored, the rest trains the re-ranked candidates. ``rerank_tokens``: tokens
    of each short distillation (default: one pass over the training part), in batches of
    ``batch_size`` on ``training_args`` (a ``TrainingArguments``; its max_steps, seed and
    saving are set here) with ``distillation_config`` (default: forward KL, τ = 1).
    ``top_k=0`` ranks zero-shot only. ``reconstruct``: ``reconstruction_stats`` of ``model``;
    every candidate is then pruned with them (``prune(..., reconstruct=)``), in the zero-shot
    rank, the short distillations and the winner. Everything is checked before any work (ValueError).
    """
    for name, value, low in (("batch_size", batch_size, 1),):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if rerank_tokens is not None and (isinstance(rerank_tokens, bool) or not isinstance(rerank_tokens, int)
                                      or rerank_tokens < 1):
        raise ValueError(f"rerank_tokens must be a positive int, got {rerank_tokens!r}")
    started = time.perf_counter()
    if scores is None:
        raise ValueError("search needs the model's importance scores (slimlm importance; "
                         "slimlm.estimate_importance in Python)")
    scores.check_model(model)
    if reconstruct is not None:
        reconstruct.check(model)
    plan = search_candidates(model, target, space=space, top_n=top_n, top_k=top_k, scores=scores)
    budget, space, shapes, meeting, chosen, counter = (plan.budget, plan.space, plan.shapes, plan.meeting,
                                                       plan.chosen, plan.counter)
    enumerate_seconds = round(time.perf_counter() - started, 3)
    rank, world = _process_group()
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is not divisible by the {world} processes: the short distillations "
                         "keep it as the global batch so that the result is one process's")
    train, held = _split(data, held_out, seed)
    from slimlm.distill.trainer import DistillationConfig

    distillation_config = distillation_config or DistillationConfig()
    distillation_config.check()

    log(f"[search] {len(shapes)} legal shapes in {enumerate_seconds} s, {len(meeting)} meet the budget; "
        f"scoring the {len(chosen)} closest")

    inputs = _inputs(model, scores, data, budget, space, top_n, top_k, held_out, seed, rerank_tokens, batch_size,
                     distillation_config, training_args, reconstruct)
    out = os.fspath(out) if out is not None else None
    finished, previous_phases = records.load_finished(out, inputs)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the record before rank 0 writes it again
    run = _Run(model, scores, train, held, {c.key: c for c in chosen},
               [finished.get(c.key) or records.candidate_record(c) for c in chosen], out, inputs,
               # Seconds per phase over every run of this search (a resumed phase adds its new work only).
               {"enumerate": enumerate_seconds, "zero_shot": previous_phases.get("zero_shot", 0.0),
                "rerank": previous_phases.get("rerank", 0.0)},
               batch_size, distillation_config, log, reconstruct, writer=rank == 0)
    zero_shot_rank(run, rank, world)
    student = distillation_rerank(run, top_k, rerank_tokens, seed, training_args, save_winner)

    ranked = sorted(run.rows[:top_k], key=lambda row: (row["distill_loss"], row["key"])) + run.rows[top_k:]
    for rank, row in enumerate(ranked, 1):
        row["rank"] = rank
    winner = ranked[0]
    winner_candidate = run.candidates[winner["key"]]
    if student is None and top_k:
        student = _saved_winner(run.winner_dir, winner["key"], model)
    if top_k == 0:
        student = prune(model, scores, winner_candidate.target(), inplace=False, reconstruct=reconstruct)
    winner_target = _winner_target(winner_candidate, scores, counter)
    if out and run.writer:
        records.write_record(out, inputs, ranked, winner, run.phases)
        records.write_results(out, ranked, winner, winner_target)
    log(f"[search] winner {winner['key']} ({winner['params']:,} params); phases (s): {run.phases}")
    return SearchResult(ranked, winner, winner_target, student, len(shapes), len(meeting), run.phases)


@dataclass
class _Run:
    """One search's state between its phases: ``rows`` (search.json's, in ``candidates``'
    order until ranked) are filled in place and written to ``out`` as each finishes."""

    model: object
    scores: ImportanceScores
    train: TokenBlocks
    held: TokenBlocks
    candidates: dict[str, Candidate]
    rows: list[dict]
    out: str | None
    inputs: dict
    phases: dict
    batch_size: int
    distillation_config: object
    log: object
    reconstruct: object = None
    writer: bool = True
    states: list | None = None

    @property
    def winner_dir(self) -> str | None:
        return os.path.join(self.out, records.WINNER_DIR) if self.out else None

    def teacher_states(self) -> list:
        """The teacher's held-out last hidden states, computed on first use only."""
        if self.states is None:
            self.states = teacher_states(self.model, self.held, self.batch_size)
        return self.states

    def losses(self, student) -> tuple[float, float]:
        return held_out_losses(student, self.held, self.teacher_states(), lm_head(self.model).detached(),
                               self.batch_size, self.distillation_config)

    def save(self) -> None:
        if self.out and self.writer:
            records.write_record(self.out, self.inputs, self.rows, None, self.phases)


def zero_shot_rank(run: _Run, rank: int = 0, world: int = 1) -> None:
    """Score the rows not scored yet — each candidate pruned in memory, then its held-out KD and
    LM loss — and sort ``run.rows`` by zero-shot KD loss. Process ``rank`` of ``world`` scores
    ``run.rows[rank::world]``; every process then holds every row's losses (gathered)."""
    started = time.perf_counter()
    for row in run.rows[rank::world]:
        if row["zero_shot_kd_loss"] is not None:
            run.log(f"[search] {row['key']}: zero-shot scored by an earlier run")
            continue
        student = prune(run.model, run.scores, run.candidates[row["key"]].target(), inplace=False,
                        reconstruct=run.reconstruct)
        row["zero_shot_kd_loss"], row["lm_loss"] = run.losses(student)
        del student
        run.log(f"[search] {row['key']} ({row['params']:,} params): zero-shot KD {row['zero_shot_kd_loss']:.4f}, "
                f"LM {row['lm_loss']:.4f}")
        run.save()
    if world > 1:
        _gather_losses(run.rows, rank, world)
        run.save()
    run.phases["zero_shot"] = round(run.phases["zero_shot"] + time.perf_counter() - started, 3)
    run.rows.sort(key=lambda row: (row["zero_shot_kd_loss"], row["key"]))


def distillation_rerank(run: _Run, top_k: int, tokens, seed: int, training_args, save_winner: bool):
    """Distill the first ``top_k`` rows' candidates the same way and record their held-out KD
    loss; the best one distilled here is returned (and saved in ``out/winner`` as soon as it
    leads), None when the leader was distilled by an earlier run."""
    started = time.perf_counter()
    student = best = None
    for row in run.rows[:top_k]:
        if row["distill_loss"] is not None:
            if best is None or row["distill_loss"] < best["distill_loss"]:
                best, student = row, None
            continue
        distilled = short_distill(run.model, run.scores, run.candidates[row["key"]], run.train, tokens,
                                  run.batch_size, seed, training_args, run.distillation_config, run.reconstruct)
        row["distill_loss"], _ = run.losses(distilled)
        run.log(f"[search] {row['key']}: KD {row['distill_loss']:.4f} after the short distillation")
        if best is None or row["distill_loss"] < best["distill_loss"]:
            best, student = row, distilled
            if run.out and run.writer and save_winner:
                from slimlm.surgery.save import save_pruned

                # In the dtype it trained in, so a distillation continuing from it starts exactly there.
                trained = str(next(student.parameters()).dtype).removeprefix("torch.")
                save_pruned(student, run.winner_dir, overwrite=True, record={"search_key": row["key"]},
                            save_dtype=trained)
        run.save()
    run.phases["rerank"] = round(run.phases["rerank"] + time.perf_counter() - started, 3)
    return student


@dataclass
class CandidatePlan:
    """What a search at a budget would score: every legal shape (``shapes``), those meeting
    the budget closest first (``meeting``) and the ``top_n`` of them scored (``chosen``)."""

    budget: Budget
    space: SearchSpace
    shapes: list[Candidate]
    meeting: list[Candidate]
    chosen: list[Candidate]
    counter: ParameterCounter


def search_candidates(model, target, *, space=None, top_n: int = 20, top_k: int = 4,
                      scores: ImportanceScores | None = None) -> CandidatePlan:
    """The candidates ``search`` would score for ``model`` at ``target`` within ``space``,
    enumerated and counted on the meta device (no weights touched, a fraction of a second):
    ValueError for a budget no legal shape meets, ``top_k`` above the candidates found, or
    (with ``scores``) a shape the scores or transformers' config checks refuse — so a search,
    or a pipeline that will run one, fails before any work."""
    space = SearchSpace.coerce(space)
    budget = Budget.coerce(target)
    budget.check()
    space.check()
    for name, value, low in (("top_n", top_n, 1), ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if top_k > top_n:
        raise ValueError(f"top_k={top_k} is larger than top_n={top_n}: only the top_n candidates are re-ranked")
    counter = ParameterCounter(model)
    dtype = resolve_dtype(budget.dtype, next(model.parameters()).dtype)
    memory_at = (budget.at_batch, budget.at_seq) if budget.at_batch and budget.at_seq else None
    shapes = enumerate_shapes(model, space, memory_at=memory_at, dtype=dtype, counter=counter)
    model_size = count_parameters(meta_model(type(model), model.config), counter.adapter)["total"]
    _, meeting = fitting(shapes, budget, model_size)
    chosen = meeting[:top_n]
    if top_k > len(chosen):
        raise ValueError(f"top_k={top_k} but only {len(chosen)} candidate(s) meet the budget "
                         f"({len(meeting)} within tolerance {budget.tolerance}); lower --top-k (search.top_k in a "
                         "recipe) or widen the search (--tolerance, --max-width-prune/--max-depth-prune)")
    if scores is not None:
        _check_candidates(model, scores, chosen, counter)
    return CandidatePlan(budget, space, shapes, meeting, chosen, counter)


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process; under a launcher (``WORLD_SIZE`` > 1) the default
    process group is set up first if nobody has (NCCL on CUDA, gloo on CPU, as the Trainer's
    ``training_arguments`` choose), and the Trainer later runs on the same group."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _gather_losses(rows: list[dict], rank: int, world: int) -> None:
    """Fill every row with the zero-shot losses the rank that owned it (``rows[r::world]``) computed."""
    import torch.distributed as dist

    mine = {row["key"]: (row["zero_shot_kd_loss"], row["lm_loss"]) for row in rows[rank::world]}
    shares = [None] * world
    dist.all_gather_object(shares, mine)
    losses = {key: value for share in shares for key, value in share.items()}
    for row in rows:
        row["zero_shot_kd_loss"], row["lm_loss"] = losses[row["key"]]


def _split(data, held_out, seed) -> tuple[TokenBlocks, TokenBlocks]:
    if not isinstance(data, TokenBlocks):
        raise ValueError(f"data must be TokenBlocks (slimlm.data.load_blocks), got {type(data).__name__}")
    try:
        return data.split(held_out, seed)
    except ValueError as error:
        raise InputError(f"calibration data too small for the held-out split: {len(data)} block(s), "
                         f"held_out={held_out!r} ({error}); give more data or a smaller held_out") from None


def _check_candidates(model, scores, chosen: list[Candidate], counter: ParameterCounter) -> None:
    """Score axes and shapes, and transformers' validation of each full config, before any work."""
    before = model_sizes(model.config)
    for candidate in chosen:
        sizes = {**before, **candidate.sizes()}
        selection = select_units(scores, before, sizes, None, candidate.depth_selection)
        pruned_config(model.config, counter.adapter, sizes, selection.kept_layers)


def _inputs(model, scores, data, budget, space, top_n, top_k, held_out, seed, rerank_tokens, batch_size,
            distillation_config, training_args, reconstruct) -> dict:
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
            "distillation": {k: str(v) for k, v in vars(distillation_config).items()}, "training": training,
            "reconstruct": reconstruct.record() if reconstruct is not None else None}


def _saved_winner(winner_dir, key: str, model):
    """The winner's distilled student saved by an earlier run, or None."""
    from slimlm.surgery.save import RECORD_FILE

    record = os.path.join(winner_dir, RECORD_FILE) if winner_dir else None
    if not record or not os.path.isfile(record):
        return None
    with open(record, encoding="utf-8") as handle:
        if json.load(handle).get("search_key") != key:
            return None
    from slimlm.models import load_model

    parameter = next(model.parameters())
    return load_model(winner_dir, dtype=parameter.dtype, device=parameter.device)


def _winner_target(candidate: Candidate, scores, counter: ParameterCounter) -> Target:
    """The winner's sizes, its dropped layers named (so the Target needs no depth choice)."""
    target = candidate.target()
    num_layers = counter.before["num_layers"]
    if candidate.num_layers < num_layers:
        kept = kept_layers_for(scores, num_layers, candidate.num_layers, candidate.depth_selection)
        target = replace(target, num_layers=None, drop_layers=[i for i in range(num_layers) if i not in kept])
    return target
