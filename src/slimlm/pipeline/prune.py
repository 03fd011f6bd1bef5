"""The prune stage: plan and prune the teacher by its scores, save a standard checkpoint."""
from __future__ import annotations

import os

from slimlm.pipeline.records import has_weights, inputs_stale_reason, read_json, stage_record
from slimlm.pipeline.stage import RunContext, Stage


def prune_stage(model, scores, target, out: str, *, tokenizer=None, overwrite: bool = False,
                inputs: dict | None = None, save_dtype=None, reconstruct=None):
    """Prune ``model`` in place to ``target`` with ``scores`` (and ``reconstruct``'s compensation,
    ``slimlm.surgery.reconstruct``, when given), save it to ``out`` in ``save_dtype`` (None/"auto":
    the source's, see ``slimlm.models.save_dtype``), recording ``inputs``; returns (model, plan)."""
    from slimlm.surgery import plan, prune, save_pruned

    the_plan = plan(model, target)
    pruned = prune(model, scores, the_plan, reconstruct=reconstruct)
    save_pruned(pruned, out, tokenizer=tokenizer, overwrite=overwrite, save_dtype=save_dtype,
                record=stage_record(inputs) if inputs is not None else None)
    return pruned, the_plan


def pruned_stale_reason(out: str, source_fingerprint: str, inputs: dict | None = None) -> str | None:
    """None when ``out`` holds a model pruned from ``source_fingerprint`` with ``inputs``, else why not."""
    from slimlm.surgery.save import RECORD_FILE

    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, RECORD_FILE))
    if record is None:
        return f"no {RECORD_FILE}"
    if record.get("source_fingerprint") != source_fingerprint:
        return "pruned from another model"
    return inputs_stale_reason(record, inputs, "") if inputs is not None else None


PLAN_FILE = "plan.txt"


class PruneStage(Stage):
    """A copy of the teacher pruned to the target — the search's winner when there was one —
    (``pruned/``, its plan's table in ``plan.txt``); its value is that table."""

    name, output = "prune", "pruned"

    def target(self, ctx: RunContext, done: dict) -> dict:
        searched = done.get("search")
        return searched["target"] if searched is not None else ctx.recipe["target"]

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        from slimlm import outputs
        from slimlm.importance.scores import SCORES_FILE
        from slimlm.pipeline.records import data_digest

        inputs = {"teacher": ctx.teacher_fp, "target": self.target(ctx, done),
                  "scores": outputs.file_digest(os.path.join(ctx.path("scores"), SCORES_FILE)),
                  "save_dtype": ctx.recipe["save_dtype"]}
        if ctx.recipe["reconstruct"] is not None:  # (absent otherwise: older run folders stay valid)
            inputs["reconstruct"] = {**ctx.recipe["reconstruct"], "train": data_digest(done["tokenize"]["train"]),
                                     "seq_len": ctx.recipe["importance"]["seq_len"]}
        return inputs

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        reason = pruned_stale_reason(ctx.path(self.output), ctx.teacher_fp, inputs)
        if reason is None and not os.path.isfile(ctx.path(PLAN_FILE)):
            return f"no {PLAN_FILE}"
        return reason

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> str:
        import copy

        from slimlm import outputs

        _, the_plan = prune_stage(copy.deepcopy(ctx.teacher), done["importance"], self.target(ctx, done),
                                  ctx.path(self.output), tokenizer=ctx.tokenizer, overwrite=True, inputs=inputs,
                                  save_dtype=ctx.recipe["save_dtype"],
                                  reconstruct=ctx.reconstruction(done["tokenize"]["train"]))
        outputs.write_text(ctx.path(PLAN_FILE), the_plan.table() + "\n")
        return self.load(ctx, done)

    def load(self, ctx: RunContext, done: dict) -> str:
        with open(ctx.path(PLAN_FILE), encoding="utf-8") as handle:
            return handle.read().rstrip()
