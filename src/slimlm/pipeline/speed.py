"""The speed stage: inference figures of the teacher and the distilled student side by side
(``slimlm.speed.speed_report``) in ``speed.json``, when the recipe asks (``eval.speed``)."""
from __future__ import annotations

from slimlm import outputs
from slimlm.pipeline.evaluate import keyed_stale_reason
from slimlm.pipeline.records import read_json, read_json_roundtrip
from slimlm.pipeline.stage import RunContext, Stage


class SpeedStage(Stage):
    """Prefill/decode tokens/s at batch 1 and 8, TTFT, TPOT, memory with the KV cache, size on
    disk and the ratios of teacher and student. Timings are of this machine at the time of the
    run: the file is kept while the models and settings are the same. Its value is the report
    (None when ``eval.speed`` is off)."""

    name, output = "speed", "speed.json"

    def wanted(self, ctx: RunContext) -> bool:
        return bool(ctx.recipe["eval"]["speed"])

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model

        section = ctx.recipe["eval"]
        self.specs = {"teacher": ctx.recipe["teacher"], "distilled": ctx.path("distilled")}
        self.models = {"teacher": ctx.teacher,
                       "distilled": load_model(self.specs["distilled"], dtype=ctx.dtype, device=ctx.device)}
        self.settings = {"prompt_tokens": section["speed_prompt_tokens"], "new_tokens": section["speed_new_tokens"],
                         "rounds": section["speed_rounds"]}
        return {"settings": self.settings, "device": ctx.device, "dtype": str(ctx.dtype),
                "fingerprints": {name: model_fingerprint(model) for name, model in self.models.items()}}

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return keyed_stale_reason(ctx.path(self.output), inputs, "models or settings")

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> dict:
        from slimlm.speed import speed_report

        report = read_json_roundtrip(speed_report(self.models, specs=self.specs, tokenizer=ctx.tokenizer,
                                                  **self.settings))
        outputs.write_json(ctx.path(self.output), {"key": inputs, "report": report})
        return report

    def load(self, ctx: RunContext, done: dict) -> dict:
        return read_json(ctx.path(self.output))["report"]
