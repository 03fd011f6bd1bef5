"""The eval stage: perplexity, speed and samples of the teacher, the pruned and the distilled
model on the held-out blocks (``eval.json``, keyed by the models' fingerprints and the data)."""
from __future__ import annotations

from slimlm import outputs
from slimlm.pipeline.recipe import general_sets
from slimlm.pipeline.records import DISTILL_RECORD, data_digest, read_json, read_json_roundtrip
from slimlm.pipeline.stage import RunContext, Stage

MODELS = ("teacher", "pruned", "distilled")


def keyed_stale_reason(path: str, key: dict, what: str) -> str | None:
    """None when the JSON file ``path`` was made for ``key`` (its "key" field); else why not."""
    previous = read_json(path)
    if previous is None:
        return "missing"
    return None if previous.get("key") == read_json_roundtrip(key) else f"made for other {what}"


class EvalStage(Stage):
    """Perplexity on the held-out blocks (and on each general held-out set's, ``data.general``),
    decode speed and samples of each model; its value is the ``evaluate_model`` results,
    the teacher's first."""

    name, output = "eval", "eval.json"

    def settings(self, ctx: RunContext) -> dict:
        return {key: value for key, value in ctx.recipe["eval"].items() if not key.startswith("speed")}

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        import os

        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model

        self.specs = {"teacher": ctx.recipe["teacher"], "pruned": ctx.path("pruned"), "distilled": ctx.path("distilled")}
        self.models = {"teacher": ctx.teacher}
        for name in MODELS[1:]:
            self.models[name] = load_model(self.specs[name], dtype=ctx.dtype, device=ctx.device)
        self.sets = done["tokenize"]
        self.general = {name: self.sets[name] for name in general_sets(ctx.recipe)}
        return {"heldout": data_digest(self.sets["heldout"]), "settings": self.settings(ctx),
                "general": {name: data_digest(shards) for name, shards in self.general.items()} or None,
                "fingerprints": {name: model_fingerprint(model) for name, model in self.models.items()},
                "distilled_record": read_json(os.path.join(self.specs["distilled"], DISTILL_RECORD)).get(
                    "train_seconds")}

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return keyed_stale_reason(ctx.path(self.output), inputs, "models or data")

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> list[dict]:
        from slimlm.evaluate import evaluate_model
        from slimlm.pipeline.distill import eval_blocks

        section = self.settings(ctx)

        def blocks(shards):  # the first max_blocks blocks: only those are read
            return eval_blocks(shards, ctx.tokenizer, section["seq_len"], section["max_blocks"], model=ctx.teacher)

        heldout = blocks(self.sets["heldout"])
        general = {name: blocks(shards) for name, shards in self.general.items()}
        results = [evaluate_model(model, heldout, tokenizer=ctx.tokenizer, prompts=section["prompts"],
                                  max_new_tokens=section["max_new_tokens"], batch_size=section["batch_size"],
                                  spec=self.specs[name], progress=ctx.progress, name=name, general_blocks=general)
                   for name, model in self.models.items()]
        outputs.write_json(ctx.path(self.output), {"key": inputs, "results": results})
        return results

    def load(self, ctx: RunContext, done: dict) -> list[dict]:
        return read_json(ctx.path(self.output))["results"]
