"""The recipe's ``search:`` stage: the student shape that distills best at the recipe's budget
(``slimlm.search``), in ``out/search``. The prune stage then cuts the winner's ``Target``, and
the distillation continues from the winner's short-distilled student (``out/search/winner``),
its re-ranking tokens counted in ``distill.max_tokens``.

``search()`` itself resumes (finished candidates are read back from ``search.json``); a
search of other inputs in the folder the recipe owns (a changed teacher file, say) is deleted
and started afresh, as every stage's stale output is.
"""
from __future__ import annotations

import os

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.stage import RunContext, Stage

SEARCH_DIR = "search"


def search_blocks(train, section: dict, seed: int, model):
    """``section["num_blocks"]`` blocks of ``seq_len`` tokens of the training shards, drawn with
    ``seed`` across the whole corpus (only those blocks are read), and how many of them train
    (the rest are the search's held-out split); InputError when that split cannot be cut."""
    from slimlm.data import check_seq_len

    check_seq_len(section["seq_len"], model, "search.seq_len")
    blocks = train.sample_blocks(section["num_blocks"], section["seq_len"], seed, pad_last=True)
    try:
        train_part, _ = blocks.split(held_out(section["held_out"]), seed)
    except ValueError as error:
        raise InputError(f"search: {len(blocks)} calibration block(s) of {section['seq_len']} tokens are too few for "
                         f"held_out={section['held_out']} ({error}); give more data, num_blocks or a smaller "
                         "held_out") from None
    return blocks, len(train_part)


def held_out(value: float, name: str = "search.held_out") -> float | int:
    """A held-out share as ``slimlm.search`` takes it: a fraction below 1, else a whole block
    count (InputError naming ``name`` otherwise; the command line's ``--held-out`` uses it too)."""
    if value < 1:
        return value
    if not float(value).is_integer():
        raise InputError(f"{name} {value}: a fraction must be in (0, 1) and a count a whole number of blocks")
    return int(value)


def rerank_steps(section: dict, train_blocks: int) -> int:
    """Optimizer steps of each re-ranked candidate's short distillation (as ``short_distill``
    counts them: ``rerank_tokens`` rounded up to whole blocks and batches, default one pass)."""
    from slimlm.search.scoring import short_distill_steps

    return short_distill_steps(section["rerank_tokens"], train_blocks, section["seq_len"], section["batch_size"])


def rerank_tokens(section: dict, train_blocks: int) -> int:
    """Training tokens the winner has seen when the full distillation continues from it (0 without re-ranking)."""
    if section["top_k"] == 0:
        return 0
    return rerank_steps(section, train_blocks) * section["batch_size"] * section["seq_len"]


def search_stage(teacher, scores, target: dict, blocks, out: str, *, section: dict, distill: dict, seed: int,
                 device: str, reconstruct=None, log=print):
    """Run (or resume) the search into ``out``; returns the ``SearchResult``. ``reconstruct``:
    the teacher's ``reconstruction_stats``, with which every candidate is pruned."""
    from slimlm.distill.trainer import DistillationConfig
    from slimlm.distill.training import student_precision_flags, training_arguments
    from slimlm.search import SearchSpace, search
    from slimlm.search.records import StaleSearch

    flags = []
    for key, value in distill["training_args"].items():
        if key not in ("save_steps", "logging_steps", "save_total_limit"):  # the short runs neither save nor log
            flags += [f"--{key}", str(value)]
    if device == "cpu":
        flags = ["--use_cpu", "true"] + flags
    # The short distillations train as the pipeline's distillation does (its student_precision).
    flags = student_precision_flags(distill["student_precision"], flags, log=log)
    args = training_arguments(flags, output_dir=outputs.staging_path(out), batch_size=section["batch_size"],
                              learning_rate=section["lr"] or distill["lr"], seed=seed)
    config = DistillationConfig(temperature=distill["temperature"], beta=distill["beta"],
                                teacher_precision=distill["teacher_precision"])
    settings = dict(space=SearchSpace.coerce(section["space"]), top_n=section["top_n"], top_k=section["top_k"],
                    held_out=held_out(section["held_out"]), seed=seed, rerank_tokens=section["rerank_tokens"],
                    batch_size=section["batch_size"], training_args=args, distillation_config=config,
                    reconstruct=reconstruct, log=log)
    try:
        return search(teacher, scores, target, blocks, out=out, **settings)
    except StaleSearch:
        log(f"[search] {out} holds a search of other inputs: deleting it and searching afresh")
        outputs.remove(out)
        return search(teacher, scores, target, blocks, out=out, **settings)


def winner_record(out: str) -> dict:
    """``search.json`` of a finished search (candidates, winner, phase_seconds)."""
    from slimlm.pipeline.records import read_json
    from slimlm.search.records import RECORD_FILE

    record = read_json(os.path.join(out, RECORD_FILE))
    if record is None or record.get("winner") is None:
        raise InputError(f"{out} holds no finished search")
    return record


def check_token_budget(max_tokens: int | None, used: int) -> None:
    if max_tokens is not None and max_tokens - used < 1:
        raise InputError(f"distill.max_tokens {max_tokens} counts the search's re-ranking tokens ({used} for the "
                         f"winner): give more than {used}, or lower search.rerank_tokens")


class SearchStage(Stage):
    """The student shape that distills best at the recipe's budget (``search/``: search.json,
    search.csv, search.png, winner_target.json, winner/), when the recipe has a search section;
    its value is the search.json record (candidates, winner, phase_seconds, the winner's target
    and ``rerank_tokens``). ``slimlm.search`` resumes on its own: finished candidates are read
    back, so the stage always runs."""

    name, output = "search", SEARCH_DIR
    resumes_itself = True

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe["search"] is not None

    def stale_reason(self, ctx: RunContext, inputs: dict | None) -> str | None:
        done = os.path.isfile(os.path.join(ctx.path(self.output), "search.json"))
        return "resuming: finished candidates are read back" if done else "missing"

    def run(self, ctx: RunContext, done: dict, inputs: dict | None) -> dict:
        import dataclasses

        section, train = ctx.recipe["search"], done["tokenize"]["train"]
        blocks, train_blocks = search_blocks(train, section, ctx.recipe["seed"], ctx.teacher)
        tokens = rerank_tokens(section, train_blocks)
        check_token_budget(ctx.recipe["distill"]["max_tokens"], tokens)
        out = ctx.path(self.output)
        result = search_stage(ctx.teacher, done["importance"], ctx.recipe["target"], blocks, out,
                              section=section, distill=ctx.recipe["distill"], seed=ctx.recipe["seed"],
                              device=ctx.device, reconstruct=ctx.reconstruction(train), log=ctx.log)
        record = winner_record(out)
        record["target"] = dataclasses.asdict(result.target)
        record["rerank_tokens"] = tokens
        return record
