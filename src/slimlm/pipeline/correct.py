"""The teacher-correction stage (Minitron): fine-tune the teacher briefly with next-token
cross-entropy on the distillation data before distilling from it, save the corrected teacher
atomically with the inputs it was made from, and skip the work when a rerun finds it done.

A corrected teacher carries its correction's inputs as ``model.slimlm_teacher_correction``;
``slimlm.pipeline.distill.distill_inputs`` records them, so a distillation from a teacher
corrected on other tokens (or not at all) never resumes this one's checkpoints.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.options import REQUIRED, Options, option
from slimlm.pipeline.records import STAGE_RECORD, data_digest, has_weights, inputs_stale_reason, read_json, \
    read_json_roundtrip
from slimlm.pipeline.stage import RunContext, Stage

CORRECTION_ATTRIBUTE = "slimlm_teacher_correction"


@dataclass
class CorrectionOptions(Options):
    """A recipe's ``correct_teacher:`` section, declared once (``slimlm.options``): the teacher
    fine-tuned on ``tokens`` tokens before distilling, at ``lr`` (default the distillation's lr /
    10), in blocks of ``seq_len`` tokens, ``batch_size`` per step (defaults: the distillation's)."""

    SECTION = "correct_teacher"

    tokens: int = option(REQUIRED, "training tokens of the correction", check="positive")
    lr: float | None = option(None, "learning rate (default: distill.lr / 10)", check="positive")
    seq_len: int | None = option(None, "tokens per training block (default: distill.seq_len)", check="positive")
    batch_size: int | None = option(None, "blocks per step (default: distill.batch_size)", check="positive")


def check_correction_settings(*, tokens, learning_rate, seq_len, batch_size) -> None:
    """InputError for a setting no correction can use, before anything is loaded or written."""
    checks = [("tokens", tokens, isinstance(tokens, int) and tokens > 0, "a positive integer"),
              ("lr", learning_rate, learning_rate > 0 and math.isfinite(learning_rate), "> 0 and finite"),
              ("seq-len", seq_len, isinstance(seq_len, int) and seq_len > 1, "an integer > 1"),
              ("batch-size", batch_size, isinstance(batch_size, int) and batch_size > 0, "a positive integer")]
    for name, value, ok, rule in checks:
        if not ok:
            raise InputError(f"teacher correction --{name} must be {rule}, got {value!r}")


def correction_inputs(teacher, train, *, tokens, seq_len=256, batch_size=8, learning_rate=1e-5, seed=0,
                      training_args=()) -> dict:
    """Everything a corrected teacher depends on: the teacher's fingerprint, the data's digest,
    the token budget and the training settings (as they read back from JSON)."""
    from slimlm.fingerprint import model_fingerprint

    return read_json_roundtrip({
        "teacher": model_fingerprint(teacher), "train": data_digest(train), "tokens": tokens,
        "seq_len": seq_len, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "training_args": list(training_args)})


def corrected_stale_reason(out: str, inputs: dict) -> str | None:
    """None when ``out`` holds a teacher corrected from ``inputs`` (``correction_inputs``), else why not."""
    if not has_weights(out):
        return "missing"
    return inputs_stale_reason(read_json(os.path.join(out, STAGE_RECORD)), inputs, f"no {STAGE_RECORD}")


def correct_teacher_stage(teacher, tokenizer, train, out: str, *, tokens: int, seq_len: int = 256,
                          batch_size: int = 8, learning_rate: float = 1e-5, seed: int = 0, training_args=(),
                          overwrite: bool = False, inplace: bool = False, save_dtype=None,
                          disable_tqdm: bool = False, log=print):
    """The teacher fine-tuned with next-token CE (``slimlm.distill.trainer.correct_teacher``) on
    ⌈tokens / (batch · accumulation · world · seq_len)⌉ steps of ``seq_len`` blocks of
    ``train`` (token shards or texts), at ``learning_rate`` (slimlm's cosine schedule, 5% warmup), in the teacher's
    own dtype. ``training_args``: more ``TrainingArguments`` flags (``--max_steps`` is refused:
    ``tokens`` is the budget), e.g. ``--bf16 true`` for mixed precision, which ``slimlm run`` and
    ``slimlm distill`` add where the student trains in it (1.6× faster on SmolLM2 where bf16 is
    native, the corrected teacher's held-out perplexity within 1%, BENCHMARKS.md).

    The result is saved to ``out`` (in ``save_dtype``; None/"auto": the teacher's source dtype)
    atomically, with ``correction_inputs`` in ``slimlm_stage.json``. When ``out`` already holds
    a teacher corrected from these same inputs, it is loaded (on the teacher's device, in its
    dtype) instead of trained again; an ``out`` made from other inputs is replaced only with
    ``overwrite`` (else InputError). ``inplace=False`` (default) trains a copy, so ``teacher``
    is left as it was. Returns the corrected teacher in eval mode, with its inputs as
    ``model.slimlm_teacher_correction``.
    """
    from transformers import set_seed

    from slimlm.distill.trainer import correct_teacher
    from slimlm.distill.items import training_items_of
    from slimlm.distill.training import tokens_per_step, training_arguments
    from slimlm.models import load_model, write_checkpoint

    check_correction_settings(tokens=tokens, learning_rate=learning_rate, seq_len=seq_len, batch_size=batch_size)
    if any(flag.split("=")[0] == "--max_steps" for flag in training_args):
        raise InputError("teacher correction takes its length from tokens; --max_steps cannot be passed to it")
    inputs = correction_inputs(teacher, train, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                               learning_rate=learning_rate, seed=seed, training_args=training_args)
    state = corrected_stale_reason(out, inputs)
    if state is None:
        log(f"[correct] {out} holds the teacher corrected on these inputs; loading it")
        parameter = next(teacher.parameters())
        corrected = load_model(out, dtype=parameter.dtype, device=parameter.device)
        setattr(corrected, CORRECTION_ATTRIBUTE, inputs)
        return corrected
    outputs.check_output(out, overwrite, what="corrected teacher")
    model = teacher if inplace else copy.deepcopy(teacher)
    set_seed(seed)
    data = training_items_of(train, tokenizer, seq_len, model=model)
    if not data:
        raise InputError("teacher correction needs training text: the data gave no token blocks")
    with outputs.atomic_output(out) as staging:
        args = training_arguments(["--save_strategy", "no", *training_args], output_dir=os.path.join(staging, "trainer"),
                                  batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        args.disable_tqdm = args.disable_tqdm or disable_tqdm
        args.max_steps = max(1, math.ceil(tokens / tokens_per_step(args, seq_len)))
        log(f"[correct] fine-tuning the teacher for {args.max_steps} steps ({tokens} tokens) at lr {learning_rate}")
        correct_teacher(model, data, args)
        outputs.remove(args.output_dir)
        write_checkpoint(model, staging, dtype=save_dtype, tokenizer=tokenizer)
        outputs.write_json(os.path.join(staging, STAGE_RECORD),
                           {"inputs": inputs, "steps": args.max_steps,
                            "tokens_seen": args.max_steps * tokens_per_step(args, seq_len)})
    setattr(model, CORRECTION_ATTRIBUTE, inputs)
    return model


class CorrectTeacherStage(Stage):
    """The teacher to distill from: Minitron's teacher correction (``teacher-corrected/``, the
    teacher fine-tuned ``correct_teacher.tokens`` tokens with CE on the training text) when the
    recipe has that section, else the teacher itself. Evaluation keeps the original teacher as
    the reference. ``correct_teacher_stage`` compares its own recorded inputs: a corrected
    teacher of these inputs is loaded, not trained again."""

    name, output = "correct_teacher", "teacher-corrected"
    resumes_itself = True

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe["correct_teacher"] is not None

    def absent(self, ctx: RunContext, done: dict):
        return ctx.teacher

    def stale_reason(self, ctx: RunContext, inputs: dict | None) -> str | None:
        return "a corrected teacher of these inputs is read back" if os.path.isdir(ctx.path(self.output)) else "missing"

    def run(self, ctx: RunContext, done: dict, inputs: dict | None):
        from slimlm.distill.training import student_precision_flags

        section, distill_section = ctx.recipe["correct_teacher"], ctx.recipe["distill"]
        # The correction trains as the distillation's student does (bf16 mixed precision where
        # native with student_precision auto: faster, the same corrected teacher; BENCHMARKS.md).
        flags = student_precision_flags(distill_section["student_precision"],
                                        ["--use_cpu", "true"] if ctx.device == "cpu" else [],
                                        log=lambda line: ctx.log(line.replace("[distill]", "[correct_teacher]")))
        return correct_teacher_stage(
            ctx.teacher, ctx.tokenizer, done["tokenize"]["train"], ctx.path(self.output), tokens=section["tokens"],
            seq_len=section["seq_len"] or distill_section["seq_len"],
            batch_size=section["batch_size"] or distill_section["batch_size"],
            learning_rate=section["lr"] or distill_section["lr"] / 10, seed=ctx.recipe["seed"], training_args=flags,
            overwrite=True, save_dtype=ctx.recipe["save_dtype"], disable_tqdm=not ctx.progress,
            log=lambda line: ctx.log(line.replace("[correct]", "[correct_teacher]")))
