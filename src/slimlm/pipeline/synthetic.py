"""The synthetic stage: sample text from the teacher into a JSONL file, resumably, with the
teacher's top-k log-probs of every position in a top-k cache per prompt source beside it
(``<out>.topk/<source>``) when asked."""
from __future__ import annotations

import os

from slimlm import outputs
from slimlm.distill.generate import cache_folder_name
from slimlm.errors import InputError
from slimlm.pipeline.records import SYNTHETIC_DONE_SUFFIX, inputs_stale_reason, read_json, read_json_roundtrip, texts_digest
from slimlm.pipeline.stage import RunContext, Stage

CACHE_SUFFIX = ".topk"


def synthetic_inputs(teacher, prompts, *, max_new_tokens=64, temperature=0.8, top_p=0.95, num_return_sequences=1,
                     batch_size=8, seed=0, chat_template=None, min_new_tokens=1, writing=None) -> dict:
    """Everything a synthetic file depends on (the slimlm engine seeds each sample, generate each
    batch by its first prompt, so the batch size counts there)."""
    from slimlm.fingerprint import model_fingerprint

    writing = dict(writing or {})
    if writing.get("dtype") is not None:
        writing["dtype"] = str(writing["dtype"]).removeprefix("torch.")
    return {"teacher": model_fingerprint(teacher), "prompts": texts_digest(f"{source}\t{prompt}"
                                                                           for source, prompt in _pairs(prompts)),
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                         "num_return_sequences": num_return_sequences, "batch_size": batch_size, "seed": seed,
                         "chat_template": chat_template, "min_new_tokens": min_new_tokens, **writing}}


def _pairs(prompts) -> list[tuple[str, str]]:
    return [item if isinstance(item, tuple) else ("data", item) for item in prompts]


def check_synthetic(teacher, tokenizer, prompts, *, writing=None, model_path=None, **settings) -> None:
    """Every check the synthetic stage makes on its settings and prompts, as an InputError,
    before anything is written (``slimlm.distill.generate.check_generation``; with engine vllm,
    that the teacher is a Hugging Face folder: ``model_path``, else the one it was loaded from)."""
    from slimlm.distill.generate import check_generation

    if (writing or {}).get("engine") == "vllm" and not writing.get("server"):
        from slimlm.distill.vllm_sampler import model_folder, require_vllm

        model_folder(teacher, model_path)
        require_vllm()  # before anything is staged
    try:
        check_generation(teacher, tokenizer, [prompt for _, prompt in _pairs(prompts)], **settings)
    except ValueError as error:
        raise InputError(f"synthetic text: {error}") from None


def generate_stage(teacher, tokenizer, prompts, out: str, *, max_new_tokens=64, temperature=0.8, top_p=0.95,
                   num_return_sequences=1, batch_size=8, seed=0, chat_template=None, min_new_tokens=1, writing=None,
                   model_path=None, progress=True, log=print):
    """Sample synthetic text from ``teacher`` into a staging sibling of the JSONL ``out``
    (continuing one an interrupted run of these same inputs left), swap it into place, then
    mark it complete with ``<out>.done.json`` (the inputs, the file's digest, the filter counts
    and the caches). ``prompts``: texts or (source, text) pairs. ``writing``: the engine, dtype,
    filters and ``keep_topk`` (``GenerationOptions.writing``); with ``keep_topk`` the top-k caches
    go to ``<out>.topk/<source>``, staged and swapped in with the file. ``model_path``: the
    teacher's Hugging Face folder for engine vllm (default: the one it was loaded from)."""
    from slimlm.distill.generate import generate_synthetic

    writing = dict(writing or {})
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    num_return_sequences=num_return_sequences, batch_size=batch_size, seed=seed,
                    chat_template=chat_template, min_new_tokens=min_new_tokens)
    out = outputs.resolve(out)
    check_synthetic(teacher, tokenizer, prompts, writing=writing, model_path=model_path, **settings)
    inputs = read_json_roundtrip(synthetic_inputs(teacher, prompts, **settings, writing=writing))
    staging = outputs.staging_path(out)
    staging_inputs = staging + ".inputs.json"
    cache = out + CACHE_SUFFIX
    staging_cache = outputs.staging_path(cache)
    if os.path.exists(staging) or os.path.exists(staging_cache):
        if read_json(staging_inputs) == {"inputs": inputs}:
            log(f"[synthetic] continuing the partial {staging}")
        else:
            log(f"[synthetic] discarding {staging}: left by a run of other inputs")
            outputs.remove(staging)
            outputs.remove(staging_cache)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    outputs.write_json(staging_inputs, {"inputs": inputs})
    keep = writing.get("keep_topk")
    dataset = generate_synthetic(teacher, tokenizer, prompts, out_path=staging, progress=progress,
                                 cache_dir=staging_cache if keep else None, model_path=model_path, **settings,
                                 **writing)
    if len(dataset) == 0:
        raise RuntimeError(f"the teacher produced no usable generation for {len(prompts)} prompts "
                           f"(filtered: {dataset.counts})")
    outputs.commit(staging, out)
    outputs.mark_file(out)
    if keep:
        outputs.claim(staging_cache)
        outputs.commit(staging_cache, cache)
    elif os.path.exists(cache):
        outputs.remove(cache)
    outputs.write_json(out + SYNTHETIC_DONE_SUFFIX, {
        "records": len(dataset), "inputs": inputs, "sha256": outputs.file_digest(out), "counts": dataset.counts,
        "sources": dataset.sources(), "caches": sorted(dataset.caches),
        "cache_manifests": cache_digests(cache, dataset.caches) if keep else {}})
    outputs.remove(staging_inputs)
    dataset.caches = {source: os.path.join(cache, cache_folder_name(source)) for source in dataset.caches}
    return dataset


def cache_digests(cache: str, sources) -> dict:
    """{source: digest of its cache's manifest} of the caches in ``cache``."""
    return {source: outputs.file_digest(os.path.join(cache, cache_folder_name(source), "manifest.json"))
            for source in sorted(sources)}


def synthetic_stale_reason(out: str, inputs: dict) -> str | None:
    """None when ``out`` (and its caches) are complete, unchanged since written, and made from ``inputs``."""
    if not os.path.isfile(out):
        return "missing"
    record = read_json(out + SYNTHETIC_DONE_SUFFIX)
    if record is None:
        return "incomplete"
    if record.get("sha256") != outputs.file_digest(out):
        return "changed since it was written"
    caches = record.get("cache_manifests") or {}
    if caches:
        try:
            if cache_digests(out + CACHE_SUFFIX, caches) != caches:
                return "its top-k caches changed since they were written"
        except OSError:
            return "its top-k caches are missing"
    return inputs_stale_reason(record, inputs, "incomplete")


def load_synthetic(out: str):
    """The ``SyntheticDataset`` of a finished synthetic file, with its caches and counts."""
    from slimlm.distill.generate import SyntheticDataset

    record = read_json(out + SYNTHETIC_DONE_SUFFIX) or {}
    return SyntheticDataset(SyntheticDataset.load(out).records, counts=record.get("counts"),
                            caches={source: os.path.join(out + CACHE_SUFFIX, cache_folder_name(source))
                                    for source in record.get("caches") or []})


def synthetic_settings(ctx: RunContext) -> dict:
    """The synthetic section's sampling settings (``GenerationOptions.sampling``)."""
    from slimlm.distill.options import GenerationOptions

    options = GenerationOptions(**ctx.recipe["synthetic"])
    return {**options.sampling(ctx.recipe["seed"]), "writing": options.writing(ctx.device)}


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


def source_prompts(sources: str, total: int, *, seed: int, data=None, tokenizer=None) -> list[tuple[str, str]]:
    """``total`` (source, prompt) pairs mixed by the weights of ``sources`` (``GenerationOptions.sources``,
    ``slimlm.distill.prompts.parse_sources``): the built-in general prompts, free sampling from
    BOS, prompts cut from ``data`` (token shards: ``shard_prompts``; or a list of texts) and
    prompt files."""
    from slimlm.distill.generate import load_prompts, prompts_from_texts
    from slimlm.distill.prompts import general_prompt_count, general_prompts, mix_prompts, parse_sources, \
        source_counts

    parsed = [source for source in parse_sources(sources) if source.weight > 0]
    weights = {source.name: source.weight for source in parsed}
    counts = source_counts(weights, total)
    pools = {}
    for source in parsed:
        name = source.name
        if source.kind == "general":  # the whole balanced draw (categories × task types) of its share
            pools[name] = general_prompts(min(counts[name], general_prompt_count()), seed=seed)
        elif source.kind == "bos":
            pools[name] = [""]
        elif source.kind == "data":
            if data is None:
                raise InputError("prompt source 'data' needs training data to cut prompts from")
            pools[name] = shard_prompts(data, tokenizer, total) if not isinstance(data, list) \
                else prompts_from_texts(data, max_prompts=total)
        else:
            pools[name] = load_prompts(source.path)
    # A pool shorter than its share is not cycled (num_return_sequences samples a prompt more than
    # once); free sampling's one empty prompt is drawn as often as its share says.
    mixed, seen = [], set()
    for pair in mix_prompts(pools, weights, total, seed=seed):
        if pair[0] == "bos" or pair not in seen:
            seen.add(pair)
            mixed.append(pair)
    return mixed


class SyntheticStage(Stage):
    """The teacher's generations from the prompts of the synthetic section's sources
    (``synthetic.jsonl``, with their top-k caches in ``synthetic.jsonl.topk/``), when the recipe
    has a synthetic section; its value is the ``SyntheticDataset`` (None without the section).
    It runs after the teacher correction: the corrected teacher writes (``synthetic.writer``),
    so the targets kept while sampling come from the teacher the distillation learns from."""

    name, output = "synthetic", "synthetic.jsonl"

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe["synthetic"] is not None

    @staticmethod
    def writer(ctx: RunContext, done: dict):
        """The teacher that writes: the corrected one (the correct_teacher stage's value, the
        teacher itself without that section) unless ``synthetic.writer`` is ``original``."""
        if ctx.recipe["synthetic"].get("writer", "corrected") == "original":
            return ctx.teacher
        return done.get("correct_teacher", ctx.teacher)

    @staticmethod
    def writer_folder(ctx: RunContext) -> str:
        """The writing teacher's folder (engine vllm reads it, and a server's model name defaults
        to it): the corrected teacher's output folder, else the recipe's teacher as given."""
        if SyntheticStage.corrected_writer(ctx):
            from slimlm.pipeline.correct import CorrectTeacherStage

            return ctx.path(CorrectTeacherStage.output)
        return ctx.recipe["teacher"]

    @staticmethod
    def corrected_writer(ctx: RunContext) -> bool:
        """Whether the teacher that writes is one this run corrects."""
        return ctx.recipe["correct_teacher"] is not None and ctx.recipe["synthetic"].get("writer") != "original"

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        section = ctx.recipe["synthetic"]
        self.prompts = source_prompts(section["sources"], section["num_prompts"], seed=ctx.recipe["seed"],
                                      data=done["tokenize"]["train"], tokenizer=ctx.tokenizer)
        settings = synthetic_settings(ctx)
        teacher = self.writer(ctx, done)
        check_synthetic(teacher, ctx.tokenizer, self.prompts, model_path=self.writer_folder(ctx), **settings)
        return synthetic_inputs(teacher, self.prompts, **settings)

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return synthetic_stale_reason(ctx.path(self.output), inputs)

    def run(self, ctx: RunContext, done: dict, inputs: dict):
        return generate_stage(self.writer(ctx, done), ctx.tokenizer, self.prompts, ctx.path(self.output),
                              model_path=self.writer_folder(ctx), progress=ctx.progress, log=ctx.log,
                              **synthetic_settings(ctx))

    def load(self, ctx: RunContext, done: dict):
        return load_synthetic(ctx.path(self.output))
