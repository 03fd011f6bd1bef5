"""The teacher-cache stage: the teacher's top-k log-probabilities on the training blocks, written
once, compressed (``slimlm.distill.topk_cache``: ~142 bytes a token at k = 64), so that the
distillation learns from them with no teacher loaded. ``teacher_cache_stage`` is the whole
stage for ``slimlm teacher-cache`` and for a recipe's ``teacher_cache:`` section.

The cached blocks are ``num_blocks`` blocks of ``seq_len`` tokens of the token shards drawn by a
seeded order (all of them by default; a recipe caches the blocks its ``distill.max_tokens``
trains on), each cached as one sequence, so the distillation's blocks are the cache's.
"""
from __future__ import annotations

import os

import numpy as np

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.records import STAGE_RECORD, data_digest, inputs_stale_reason, read_json, read_json_roundtrip
from slimlm.pipeline.stage import RunContext, Stage


def cache_inputs(teacher, shards, options, *, seq_len: int, num_blocks: int, temperature: float, seed: int) -> dict:
    """What a teacher cache is made from: the teacher's weights (a served teacher: its name as
    served, ``ServedTeacher``), the shards, the blocks and the codec."""
    from slimlm.fingerprint import model_fingerprint
    from slimlm.pipeline.correct import CORRECTION_ATTRIBUTE

    correction = getattr(teacher, CORRECTION_ATTRIBUTE, None)
    identity = teacher.identity if isinstance(teacher, ServedTeacher) else model_fingerprint(teacher)
    return {"teacher": identity, **({"teacher_correction": correction} if correction else {}),
            "shards": data_digest(shards), "seq_len": seq_len, "num_blocks": num_blocks, "seed": seed,
            "temperature": temperature, "k": options.k, "prob_bits": options.prob_bits}


class ServedTeacher:
    """A teacher served elsewhere (``slimlm.distill.served``: vLLM in this process, or an
    OpenAI-compatible server), for ``teacher_cache_stage``; ``identity`` names it in records."""

    def __init__(self, engine, identity: str):
        self.engine, self.identity = engine, identity


def cache_stale_reason(out: str, inputs: dict) -> str | None:
    """None when ``out`` holds a finished cache made from ``inputs``, else why not."""
    if not os.path.isdir(out):
        return "missing"
    return inputs_stale_reason(read_json(os.path.join(out, STAGE_RECORD)), inputs, "unfinished")


def cache_blocks(shards, seq_len: int, num_blocks: int | None, seed: int):
    """The block indices to cache, in cache order: ``num_blocks`` (default all) of the shards'
    blocks of ``seq_len`` tokens in the seeded order of ``slimlm.shards.Permutation``."""
    from slimlm.shards import Permutation

    blocks = shards.blocks(seq_len)
    if len(blocks) == 0:
        raise InputError(f"the token shards {shards.path} hold fewer than {seq_len} tokens: no block to cache")
    count = len(blocks) if num_blocks is None else min(num_blocks, len(blocks))
    return blocks, Permutation(len(blocks), seed), count


def teacher_cache_stage(teacher, tokenizer, shards, out: str, options=None, *, seq_len: int, num_blocks=None,
                        temperature: float = 1.0, seed: int = 0, log=print) -> str:
    """Cache ``teacher``'s (a model, or a ``ServedTeacher``) top k on ``num_blocks`` blocks of ``seq_len`` tokens of ``shards`` into
    ``out`` as ``options`` (``TeacherCacheOptions``) say; returns ``out``. A finished cache of these
    inputs is kept; an unfinished one of the same inputs is continued; another is deleted (the
    caller has checked that ``out`` may be replaced: ``outputs.check_output``)."""
    from slimlm.distill.options import TeacherCacheOptions
    from slimlm.distill.topk_cache import cache_teacher_topk

    options = options if options is not None else TeacherCacheOptions()
    blocks, order, count = cache_blocks(shards, seq_len, num_blocks, seed)
    inputs = cache_inputs(teacher, shards, options, seq_len=seq_len, num_blocks=count, temperature=temperature,
                          seed=seed)
    reason = cache_stale_reason(out, inputs)
    if reason is None:
        log(f"[teacher-cache] {out} holds the teacher's top {options.k} on these blocks")
        return out
    # An unfinished cache is continued only when it was begun from these very inputs (recorded
    # beside it when it began: the cache's own manifest cannot tell two teachers' weights apart).
    pending = out + ".inputs.json"
    unfinished_here = reason == "unfinished" and (read_json(os.path.join(out, "manifest.json")) or {}).get(
        "complete") is False and read_json(pending) == {"inputs": read_json_roundtrip(inputs)}
    if not unfinished_here and os.path.lexists(out):
        outputs.remove(out)
    outputs.write_json(pending, {"inputs": inputs})
    log(f"[teacher-cache] the teacher's top {options.k} on {count:,} blocks of {seq_len} tokens "
        f"({count * seq_len:,} tokens) into {out}")

    def sequences():
        step = 1 << 14
        for start in range(0, count, step):
            for index in order(range(start, min(count, start + step))).tolist():
                yield np.array(blocks.ids(index))  # (a copy: the shards are mapped read-only)

    try:
        if isinstance(teacher, ServedTeacher):
            from slimlm.distill.served import served_teacher_topk

            served_teacher_topk(sequences(), options.k, out, engine=teacher.engine, temperature=temperature,
                                batch_size=options.batch_size, prob_bits=options.prob_bits, tokenizer=tokenizer,
                                shards=inputs["shards"])
        else:
            cache_teacher_topk(teacher, sequences(), options.k, out, temperature=temperature,
                               batch_size=options.batch_size, prob_bits=options.prob_bits,
                               tokenizer=tokenizer, shards=inputs["shards"])
    except ValueError as error:  # k above the vocabulary, a bad codec setting
        raise InputError(f"teacher cache: {error}") from None
    outputs.claim(out)
    outputs.write_json(os.path.join(out, STAGE_RECORD), {"inputs": inputs})
    outputs.remove(pending)
    return out


def cached_blocks(max_tokens: int | None, seq_len: int) -> int | None:
    """The blocks a recipe caches: those ``distill.max_tokens`` trains on (all without a budget)."""
    return None if max_tokens is None else -(-max_tokens // seq_len)


class TeacherCacheStage(Stage):
    """The (corrected) teacher's top k on the blocks the distillation trains on
    (``teacher-cache/``), when the recipe has a ``teacher_cache`` section; its value is the cache
    folder (None without the section)."""

    name, output = "teacher_cache", "teacher-cache"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe["teacher_cache"] is not None

    def _settings(self, ctx: RunContext, done: dict) -> dict:
        from slimlm.distill.options import TeacherCacheOptions

        section = ctx.recipe["distill"]
        return dict(options=TeacherCacheOptions(**ctx.recipe["teacher_cache"]), seq_len=section["seq_len"],
                    num_blocks=cached_blocks(section["max_tokens"], section["seq_len"]),
                    temperature=section["temperature"], seed=ctx.recipe["seed"])

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        settings = self._settings(ctx, done)
        _, _, count = cache_blocks(done["tokenize"]["train"], settings["seq_len"], settings["num_blocks"],
                                   settings["seed"])
        return cache_inputs(done["correct_teacher"], done["tokenize"]["train"], settings.pop("options"),
                            **{**settings, "num_blocks": count})

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return cache_stale_reason(ctx.path(self.output), inputs)

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> str:
        return teacher_cache_stage(done["correct_teacher"], ctx.tokenizer, done["tokenize"]["train"],
                                   ctx.path(self.output), log=ctx.log, **self._settings(ctx, done))

    def load(self, ctx: RunContext, done: dict) -> str:
        return ctx.path(self.output)
