"""The synthetic stage: sample text from the teacher into a JSONL file, resumably."""
from __future__ import annotations

import os

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.records import SYNTHETIC_DONE_SUFFIX, inputs_stale_reason, read_json, read_json_roundtrip, texts_digest
from slimlm.pipeline.stage import RunContext, Stage


def synthetic_inputs(teacher, prompts, *, max_new_tokens=64, temperature=0.8, top_p=0.95, num_return_sequences=1,
                     batch_size=8, seed=0, chat_template=None) -> dict:
    """Everything a synthetic file depends on (batches are seeded by their first prompt, so the batch size counts)."""
    from slimlm.fingerprint import model_fingerprint

    return {"teacher": model_fingerprint(teacher), "prompts": texts_digest(prompts),
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                         "num_return_sequences": num_return_sequences, "batch_size": batch_size, "seed": seed,
                         "chat_template": chat_template}}


def check_synthetic(teacher, tokenizer, prompts, **settings) -> None:
    """Every check the synthetic stage makes on its settings and prompts, as an InputError,
    before anything is written (``slimlm.distill.generate.check_generation``)."""
    from slimlm.distill.generate import check_generation

    try:
        check_generation(teacher, tokenizer, prompts, **settings)
    except ValueError as error:
        raise InputError(f"synthetic text: {error}") from None


def generate_stage(teacher, tokenizer, prompts, out: str, *, max_new_tokens=64, temperature=0.8, top_p=0.95,
                   num_return_sequences=1, batch_size=8, seed=0, chat_template=None, progress=True, log=print):
    """Sample synthetic text from ``teacher`` into a staging sibling of the JSONL ``out``
    (continuing one an interrupted run of these same inputs left), swap it into place, then
    mark it complete with ``<out>.done.json`` (the inputs and the file's digest)."""
    from slimlm.distill.generate import generate_synthetic

    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    num_return_sequences=num_return_sequences, batch_size=batch_size, seed=seed,
                    chat_template=chat_template)
    out = outputs.resolve(out)
    check_synthetic(teacher, tokenizer, prompts, **settings)
    inputs = read_json_roundtrip(synthetic_inputs(teacher, prompts, **settings))
    staging = outputs.staging_path(out)
    staging_inputs = staging + ".inputs.json"
    if os.path.exists(staging):
        if read_json(staging_inputs) == {"inputs": inputs}:
            log(f"[synthetic] continuing the partial {staging}")
        else:
            log(f"[synthetic] discarding {staging}: left by a run of other inputs")
            outputs.remove(staging)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    outputs.write_json(staging_inputs, {"inputs": inputs})
    dataset = generate_synthetic(teacher, tokenizer, prompts, out_path=staging, progress=progress, **settings)
    if len(dataset) == 0:
        raise RuntimeError(f"the teacher produced no usable generation for {len(prompts)} prompts")
    outputs.commit(staging, out)
    outputs.mark_file(out)
    outputs.write_json(out + SYNTHETIC_DONE_SUFFIX, {"records": len(dataset), "inputs": inputs,
                                                     "sha256": outputs.file_digest(out)})
    outputs.remove(staging_inputs)
    return dataset


def synthetic_stale_reason(out: str, inputs: dict) -> str | None:
    """None when ``out`` is complete, unchanged since written, and made from ``inputs``."""
    if not os.path.isfile(out):
        return "missing"
    record = read_json(out + SYNTHETIC_DONE_SUFFIX)
    if record is None:
        return "incomplete"
    if record.get("sha256") != outputs.file_digest(out):
        return "changed since it was written"
    return inputs_stale_reason(record, inputs, "incomplete")


def synthetic_settings(ctx: RunContext) -> dict:
    """The synthetic section's sampling settings (``GenerationOptions.sampling``)."""
    from slimlm.distill.options import GenerationOptions

    return GenerationOptions(**ctx.recipe["synthetic"]).sampling(ctx.recipe["seed"])


def shard_prompts(shards, tokenizer, max_prompts: int) -> list[str]:
    """Prompts cut from the training shards' documents, in order (``prompts_from_texts``), read
    one document at a time until there are ``max_prompts``; InputError when none can be cut."""
    from slimlm.distill.generate import prompts_from_texts

    eos = tokenizer.eos_token_id

    def documents():
        for index in range(shards.num_documents):
            ids = shards.document(index).tolist()
            yield tokenizer.decode([token for token in ids if token != eos], skip_special_tokens=True)

    prompts = prompts_from_texts(documents(), max_prompts=max_prompts)
    if not prompts:
        raise InputError("no prompts could be cut from data.train for the synthetic stage")
    return prompts


class SyntheticStage(Stage):
    """The teacher's generations from prompts of the training data (``synthetic.jsonl``), when
    the recipe has a synthetic section; its value is their texts (None without the section)."""

    name, output = "synthetic", "synthetic.jsonl"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe["synthetic"] is not None

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        self.prompts = shard_prompts(done["tokenize"]["train"], ctx.tokenizer, ctx.recipe["synthetic"]["num_prompts"])
        check_synthetic(ctx.teacher, ctx.tokenizer, self.prompts, **synthetic_settings(ctx))
        return synthetic_inputs(ctx.teacher, self.prompts, **synthetic_settings(ctx))

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return synthetic_stale_reason(ctx.path(self.output), inputs)

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> list[str]:
        return generate_stage(ctx.teacher, ctx.tokenizer, self.prompts, ctx.path(self.output), progress=ctx.progress,
                              log=ctx.log, **synthetic_settings(ctx)).texts()

    def load(self, ctx: RunContext, done: dict) -> list[str]:
        from slimlm.distill.generate import SyntheticDataset

        return SyntheticDataset.load(ctx.path(self.output)).texts()
