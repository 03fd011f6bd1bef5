"""The tokenize stage: the recipe's data tokenised once into token shards (``tokens/``), which
every later stage reads from disk in constant memory (``slimlm.shards``).

``tokens/train`` holds the training text; ``tokens/heldout`` the held-out text — ``data.heldout``,
or, without it, the documents of ``data.train`` that a seeded split by document sets aside
(``data.heldout_fraction``; each document on one side only, never used for calibration or
training); ``tokens/<split>`` each general held-out set of ``data.general`` (``general`` when given bare).
"""
from __future__ import annotations

import os

from slimlm.errors import InputError
from slimlm.pipeline.recipe import general_sets
from slimlm.pipeline.stage import RunContext, Stage

SETS = ("train", "heldout")  # and the general held-out sets (recipe.general_sets)


def shard_plan(ctx: RunContext) -> dict[str, tuple[list | str, object]]:
    """{set name: (sources, TokenizeOptions)} of the recipe's data (the general set only when given)."""
    from slimlm.shards import TokenizeOptions

    data, seed = ctx.recipe["data"], ctx.recipe["seed"]
    section = ctx.recipe["tokenize"]
    common = dict(section, text_field=data["text_field"])

    def options(**changes):
        return TokenizeOptions(**{**common, **changes})

    if data["heldout"] is not None:
        plan = {"train": (data["train"], options()), "heldout": (data["heldout"], options())}
    else:
        split = dict(heldout_fraction=data["heldout_fraction"], seed=seed)
        plan = {"train": (data["train"], options(documents="train", **split)),
                "heldout": (data["train"], options(documents="heldout", **split))}
    for name, sources in general_sets(ctx.recipe).items():
        plan[name] = (sources, options())
    return plan


class TokenizeStage(Stage):
    """Token shards of the training, held-out and general text; its value is {set name:
    ``TokenShards``}: train, heldout and each split of ``data.general``."""

    name, output = "tokenize", "tokens"

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        return {"plan": shard_plan(ctx)}

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        from slimlm.shards import shards_stale_reason

        for name, (sources, options) in inputs["plan"].items():
            reason = shards_stale_reason(ctx.path(os.path.join(self.output, name)), ctx.tokenizer, sources, options)
            if reason is not None:
                return f"{name}: {reason}"
        if ctx.recipe["distill"]["corpus_sources"]:  # shards of an older slimlm lack each token's source
            from slimlm.shards import TokenShards

            try:
                TokenShards(ctx.path(os.path.join(self.output, "train"))).source_ranges()
            except InputError as error:
                return f"train: {error}"
        return None

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> dict:
        from slimlm.shards import write_shards

        for name, (sources, options) in inputs["plan"].items():
            try:
                write_shards(sources, ctx.tokenizer, ctx.path(os.path.join(self.output, name)), options=options,
                             overwrite=True, progress=ctx.progress, log=ctx.log)
            except InputError as error:
                if options.documents != "heldout":
                    raise
                raise InputError(f"data.heldout_fraction {options.heldout_fraction} set no document of data.train "
                                 f"aside ({error}): give data.heldout or a larger fraction") from None
        return self.load(ctx, done)

    def load(self, ctx: RunContext, done: dict) -> dict:
        from slimlm.shards import TokenShards

        shards = {}
        for name in shard_plan(ctx):
            shards[name] = TokenShards(ctx.path(os.path.join(self.output, name)))
        for name in ("train", "heldout"):
            if shards[name].num_tokens == 0:
                what = "data.heldout_fraction left no held-out document: give data.heldout" if name == "heldout" \
                    and ctx.recipe["data"]["heldout"] is None else f"data.{name} holds no text"
                raise InputError(f"{what} ({shards[name].num_documents} documents)")
        return shards
