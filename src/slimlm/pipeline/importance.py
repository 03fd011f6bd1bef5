"""The importance stage: score the teacher on calibration blocks into a scores folder."""
from __future__ import annotations

import os

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.records import STAGE_RECORD, data_digest, inputs_stale_reason, read_json, stage_record
from slimlm.pipeline.stage import RunContext, Stage


def importance_stage(model, calibration, out: str, options=None, *, seed: int = 0, progress: bool = True,
                     inputs: dict | None = None, fingerprint: str | None = None):
    """Score ``model`` on ``calibration`` (TokenBlocks; ``options.num_samples`` of them drawn with
    ``seed``) as ``options`` (``ImportanceOptions``; default: its defaults) says, and save to
    ``out`` atomically, with ``inputs`` (what the scores were made from) recorded beside.
    ``fingerprint``: the model's, when the caller has it (``estimate_importance``)."""
    from slimlm.importance import estimate_importance
    from slimlm.importance.options import ImportanceOptions

    options = options if options is not None else ImportanceOptions()
    calibration = calibration.sample(options.num_samples, seed)
    scores = estimate_importance(model, calibration, metrics=tuple(options.metrics), depth=tuple(options.depth),
                                 batch_size=options.batch_size, progress=progress,
                                 loss_drop_samples=options.loss_drop_samples, fingerprint=fingerprint)
    with outputs.atomic_output(out) as staging:
        scores.write(staging)
        if inputs is not None:
            outputs.write_json(os.path.join(staging, STAGE_RECORD), stage_record(inputs))
    return scores


def load_scores(folder: str, model=None):
    """``ImportanceScores.load`` with an unreadable or truncated file as an InputError naming it."""
    from slimlm.importance import ImportanceScores

    try:
        return ImportanceScores.load(folder, model=model)
    except ValueError as error:  # not a scores folder, invalid meta.json, scores of another model
        raise InputError(str(error)) from None
    except Exception as error:  # safetensors raises its own error type for a torn file
        raise InputError(f"scores {folder}: unreadable scores.safetensors ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None


def scores_stale_reason(out: str, model, inputs: dict | None = None) -> str | None:
    """None when ``out`` holds scores of ``model`` made from ``inputs``, else why not."""
    from slimlm.fingerprint import model_fingerprint

    if not os.path.isdir(out):
        return "missing"
    try:
        scores = load_scores(out)
    except Exception as error:  # any unreadable file means: compute again
        return f"unreadable ({error})"
    if scores.meta.get("fingerprint") != model_fingerprint(model):
        return "computed on another model"
    if inputs is not None:
        return inputs_stale_reason(read_json(os.path.join(out, STAGE_RECORD)), inputs, f"no {STAGE_RECORD}")
    return None


class ImportanceStage(Stage):
    """Scores of the teacher on calibration blocks of the training data (``scores/``)."""

    name, output = "importance", "scores"

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        return {"teacher": ctx.teacher_fp, "train": data_digest(done["tokenize"]["train"]),
                "settings": ctx.recipe["importance"], "seed": ctx.recipe["seed"]}

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return scores_stale_reason(ctx.path(self.output), ctx.teacher, inputs)

    def run(self, ctx: RunContext, done: dict, inputs: dict):
        from slimlm.data import check_seq_len
        from slimlm.importance.options import ImportanceOptions

        options = ImportanceOptions(**ctx.recipe["importance"])
        check_seq_len(options.seq_len, ctx.teacher, "importance.seq_len")
        # The calibration blocks drawn from the shards by a seeded index: nothing else is read.
        calibration = done["tokenize"]["train"].sample_blocks(options.num_samples, options.seq_len, ctx.recipe["seed"],
                                                             pad_last=True)
        return importance_stage(ctx.teacher, calibration, ctx.path(self.output), options, seed=ctx.recipe["seed"],
                                progress=ctx.progress, inputs=inputs, fingerprint=ctx.teacher_fp)

    def load(self, ctx: RunContext, done: dict):
        return load_scores(ctx.path(self.output), model=ctx.teacher)
