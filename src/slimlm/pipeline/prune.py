"""The prune stage: plan and prune the teacher by its scores, save a standard checkpoint."""
from __future__ import annotations

import os

from slimlm.pipeline.records import has_weights, inputs_stale_reason, read_json, stage_record


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
