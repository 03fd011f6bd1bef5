"""The report stage: the run's report (``report/``: report.md, report.html, the plots) from
every earlier stage's value, written by every run (it reads only what the stages made)."""
from __future__ import annotations

import os

import torch

from slimlm.pipeline.records import DISTILL_RECORD, read_json
from slimlm.pipeline.stage import RunContext, Stage


class ReportStage(Stage):
    """``slimlm.report.write_report`` with the run's notes (``slimlm.report.run_notes``); its
    value is {"report", "table", "results"}."""

    name, output, every_run = "report", "report", True

    def __init__(self, timings: dict[str, float] | None = None):
        self.timings = timings if timings is not None else {}

    def run(self, ctx: RunContext, done: dict, inputs: dict | None) -> dict:
        from slimlm.report import run_notes, sizes_note, write_report

        recipe = ctx.recipe
        distilled = ctx.path("distilled")
        config = read_json(os.path.join(distilled, "config.json")) or {}
        saved = config.get("dtype") or config.get("torch_dtype") or "float32"
        sets = done["tokenize"]
        documents = {name: shards.num_documents if shards is not None else None for name, shards in sets.items()}
        tokens = {name: shards.num_tokens if shards is not None else None for name, shards in sets.items()}
        notes = run_notes(recipe, command=ctx.command, documents=documents, tokens=tokens,
                          distill_record=read_json(os.path.join(distilled, DISTILL_RECORD)),
                          sizes=sizes_note(recipe["teacher"], saved, recipe["save_dtype"]),
                          device=f"{ctx.device} ({torch.get_num_threads()} threads)", timings=self.timings)
        report = write_report(ctx.path(self.output), results=done["eval"], scores=done["importance"],
                              log_history=done["distill"], plan_text=done["prune"], notes=notes,
                              title=recipe["report"]["title"], speed=done["speed"], search=done["search"],
                              sections=report_sections(done))
        return {"report": report, "table": report["table"], "results": done["eval"]}


def report_sections(done: dict) -> dict[str, list[str]]:
    """The report's sections beyond the one-shot run's: a gradual schedule's steps, and what the
    teacher wrote (prompt sources, filtered samples, cached targets)."""
    sections = {}
    if done.get("gradual") is not None:
        from slimlm.pipeline.gradual import gradual_report_lines

        sections["Gradual pruning: the steps"] = gradual_report_lines(done["gradual"])
    synthetic = done.get("synthetic")
    if synthetic is not None:
        sources = ", ".join(f"{source} {count}" for source, count in synthetic.sources().items())
        dropped = ", ".join(f"{reason} {count}" for reason, count in (synthetic.counts or {}).items()
                            if reason != "kept" and count)
        tokens = sum(record.get("num_new_tokens", 0) for record in synthetic.records)
        sections["Teacher-written text"] = [
            f"{len(synthetic)} samples ({tokens:,} new tokens) by prompt source: {sources}.",
            f"Dropped by the filters: {dropped or 'none'}.",
            "The distillation learns on them from the teacher's top-k log-probs kept while it sampled "
            "(no second teacher pass)." if synthetic.caches else
            "The distillation runs the teacher on them like on the corpus."]
    return sections
