"""Synthetic distillation data: text the teacher writes itself.

``generate_synthetic`` samples continuations (or chat answers) of prompts from the teacher
in batches with the KV cache and appends them to a JSONL file, one record per line::

    {"prompt": ..., "generation": ..., "text": prompt + generation, "sample": i,
     "num_new_tokens": n, "teacher": {"name": ..., "fingerprint": ...},
     "sampling": {"max_new_tokens": ..., "temperature": ..., "top_p": ..., "seed": ...}}

A run that stops midway resumes: prompts whose samples are already in the file are skipped.
Identical generations are written once, and generations outside the length bounds are dropped.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class SamplingParams:
    """How the teacher samples; recorded in every record for provenance."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    num_return_sequences: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")


class SyntheticDataset(torch.utils.data.Dataset):
    """The records of a synthetic JSONL file (dicts, see the module docstring)."""

    def __init__(self, records: list[dict], *, counts: dict | None = None, caches: dict | None = None):
        self.records = records
        self.counts = counts or {}
        self.caches = caches or {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def texts(self) -> list[str]:
        """Prompt and generation of every record, joined as the teacher saw them: what the student is distilled on."""
        return [record["text"] for record in self.records]

    def texts_by_source(self) -> dict[str, list[str]]:
        """{prompt source: the texts of its records} (records without a source count as "data")."""
        found: dict[str, list[str]] = {}
        for record in self.records:
            found.setdefault(record.get("source", "data"), []).append(record["text"])
        return found

    def sources(self) -> dict[str, int]:
        """{prompt source: records} (records of files before sources were kept count as "data")."""
        found: dict[str, int] = {}
        for record in self.records:
            found[record.get("source", "data")] = found.get(record.get("source", "data"), 0) + 1
        return found

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticDataset":
        return cls(read_jsonl(path))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a torn last line (an interrupted write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                break  # the last write was interrupted; that record is regenerated
            raise InputError(f"{path}:{number} is not valid JSON") from None
    return records


def read_json_file(path) -> dict | None:
    """A JSON file's value; None when it does not parse."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None


def _drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut a last line that an interrupted run left without its newline, so appends stay valid JSONL."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def load_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Prompts from a JSONL file (``field`` of each record) or a text file (one per non-empty line)."""
    if not os.path.isfile(path):
        raise InputError(f"prompts file {path} does not exist")
    if str(path).endswith((".jsonl", ".json")):
        prompts = []
        for number, record in enumerate(read_jsonl(path), start=1):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{path}: record {number} has no string field {field!r}")
            prompts.append(record[field])
    else:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts")
    return prompts


def prompts_from_texts(texts: Iterable[str], *, max_prompts: int, sentences: int = 1, min_chars: int = 20) -> list[str]:
    """Cut prompts from a classic corpus: the first ``sentences`` sentences of each text
    (paragraph), skipping fragments shorter than ``min_chars``; duplicates dropped."""
    prompts, seen = [], set()
    for text in texts:
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) < min_chars:
                continue
            prompt = " ".join(_SENTENCE_END.split(paragraph)[:sentences])
            if len(prompt) >= min_chars and prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
                if len(prompts) == max_prompts:
                    return prompts
    return prompts


def _encode_prompt(tokenizer, prompt: str, chat_template) -> list[int]:
    if prompt == "":  # free sampling: from the BOS token alone (EOS for a tokenizer without one)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start] if start is not None else []
    if chat_template is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    template = None if chat_template is True else chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_generation(teacher, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
                     temperature: float = 0.8, top_p: float = 0.95, num_return_sequences: int = 1,
                     batch_size: int = 8, seed: int = 0, chat_template=None, min_new_tokens: int = 1) -> list[list[int]]:
    """Check generation settings against the teacher and the prompts before anything is
    written (ValueError naming the setting): sampling values, batch size, prompts that tokenise
    to nothing or leave no room for ``max_new_tokens`` in the teacher's context. Returns the
    prompts' token ids."""
    SamplingParams(max_new_tokens, temperature, top_p, num_return_sequences, seed).check()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts given")
    if min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    encoded = [_encode_prompt(tokenizer, prompt, chat_template) for prompt in prompts]
    context = _context_length(teacher)
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenisation")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the teacher's context of {context} tokens"
            )
    return encoded


ENGINES = ("slimlm", "generate", "vllm")


def _sources_and_prompts(prompts) -> tuple[list[str], list[str]]:
    """(source names, prompt texts) of prompts given as texts (source "data") or (source, text) pairs."""
    pairs = [(item if isinstance(item, tuple) else ("data", item)) for item in prompts]
    return [source for source, _ in pairs], [prompt for _, prompt in pairs]


def _sentence_end(tokenizer, new_ids: list[int]) -> int:
    """The length of the longest prefix of ``new_ids`` whose text ends a sentence (0: none does)."""
    for length in range(len(new_ids), 0, -1):
        if tokenizer.decode(new_ids[:length], skip_special_tokens=True).rstrip().endswith((".", "!", "?", '."', '!"',
                                                                                               '?"')):
            return length
    return 0


def _hf_generate(teacher, encoded, todo, *, batch_size, pad_id, eos_id, seed, num_return_sequences, **sampling):
    """Samples of HF ``generate`` (left-padded batches seeded by their first prompt), as
    ``slimlm.distill.sampler.Sample``-like tuples (index, prompt ids, new ids, finish)."""
    device = next(teacher.parameters()).device
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        torch.manual_seed(seed + batch[0])
        with torch.no_grad():
            output = teacher.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                      do_sample=True, num_return_sequences=num_return_sequences, pad_token_id=pad_id,
                                      use_cache=True, **sampling)
        new_tokens = output[:, width:].cpu()
        for row in range(new_tokens.shape[0]):
            index = batch[row // num_return_sequences]
            tokens, finish = new_tokens[row].tolist(), "length"
            if eos_id is not None and eos_id in tokens:
                tokens, finish = tokens[: tokens.index(eos_id)], "eos"
            yield index, row % num_return_sequences, encoded[index], tokens, finish, None


def _slimlm_sample(teacher, encoded, todo, *, batch_size, eos_id, seed, num_return_sequences, keep_topk, dtype,
                   max_new_tokens, temperature, top_p):
    """Samples of ``slimlm.distill.sampler.sample``: every (prompt, return sequence) its own
    seeded stream, so the samples do not depend on the batching."""
    from slimlm.distill.sampler import sample

    expanded = [(index, repeat) for index in todo for repeat in range(num_return_sequences)]
    if not expanded:  # a resumed run with every prompt done
        return
    for drawn in sample(teacher, [encoded[index] for index, _ in expanded], max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, eos_token_id=eos_id,
                        keep_topk=keep_topk, dtype=dtype, streams=[index * num_return_sequences + repeat
                                                                   for index, repeat in expanded]):
        index, repeat = expanded[drawn.index]
        rows = None if drawn.topk_logprobs is None else (drawn.topk_logprobs, drawn.topk_indices)
        yield index, repeat, drawn.prompt_ids, list(drawn.new_ids), drawn.finish, rows


def _engine_sample(engine, encoded, todo, *, batch_size, eos_id, seed, num_return_sequences, keep_topk,
                   max_new_tokens, temperature, top_p):
    """Samples of an engine object with ``slimlm.distill.vllm_sampler.VLLMSampler``'s ``sample``,
    every (prompt, return sequence) its own stream, as ``_slimlm_sample``."""
    expanded = [(index, repeat) for index in todo for repeat in range(num_return_sequences)]
    if not expanded:
        return
    for drawn in engine.sample([encoded[index] for index, _ in expanded], max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, seed=seed, eos_token_id=eos_id,
                               keep_topk=keep_topk, batch_size=batch_size,
                               streams=[index * num_return_sequences + repeat for index, repeat in expanded]):
        index, repeat = expanded[drawn.index]
        rows = None if drawn.topk_logprobs is None else (drawn.topk_logprobs, drawn.topk_indices)
        yield index, repeat, drawn.prompt_ids, list(drawn.new_ids), drawn.finish, rows


def cache_folder_name(source: str) -> str:
    """The folder of a prompt source's top-k cache: its name with anything but letters, digits,
    '.', '_' and '-' as '_' (a file source is named by its path)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", source).strip(".") or "_"


class _Caches:
    """One top-k cache writer per prompt source (``<cache_dir>/<source>``), continued on resume:
    the sequences of records read back that a cache does not hold yet are computed by a teacher
    forward (``teacher_topk``), the new ones come with their sampled rows."""

    def __init__(self, teacher, tokenizer, cache_dir: str, k: int):
        from slimlm.architectures import lm_head
        from slimlm.distill.topk_cache import teacher_identity

        self.teacher, self.tokenizer, self.folder, self.k = teacher, tokenizer, cache_dir, k
        self.identity, self.vocab = teacher_identity(teacher), lm_head(teacher).weight.shape[0]
        self.writers: dict = {}

    def writer(self, source: str):
        from slimlm.distill.topk_cache import TopKCacheWriter

        if source not in self.writers:
            folder = os.path.join(self.folder, cache_folder_name(source))
            manifest = os.path.join(folder, "manifest.json")
            if os.path.isfile(manifest) and (read_json_file(manifest) or {}).get("complete"):
                # finished by a run stopped before its file was swapped in: written again from the records
                shutil.rmtree(folder)
            self.writers[source] = TopKCacheWriter(os.path.join(self.folder, cache_folder_name(source)), k=self.k,
                                                   vocab_size=self.vocab,
                                                   teacher=self.identity, tokenizer=self.tokenizer,
                                                   shard_tokens=1 << 16)
        return self.writers[source]

    def add(self, source: str, ids: list[int], rows) -> None:
        writer = self.writer(source)
        if not writer.needs(ids):
            return
        if rows is None:
            from slimlm.distill.topk_cache import teacher_topk

            device = next(self.teacher.parameters()).device
            logprobs, indices = teacher_topk(self.teacher, torch.tensor([ids], device=device), self.k)
            rows = (logprobs[0].cpu(), indices[0].cpu())
        logprobs, indices = rows
        if logprobs.shape[0] < len(ids):  # the row after a closing EOS is never a target (a sequence start follows)
            extra = len(ids) - logprobs.shape[0]
            logprobs = torch.cat([logprobs, logprobs[-1:].expand(extra, -1)])
            indices = torch.cat([indices, indices[-1:].expand(extra, -1)])
        writer.add(ids, logprobs[: len(ids)], indices[: len(ids)])

    def finish(self) -> dict[str, str]:
        paths = {}
        for source, writer in self.writers.items():
            writer.finish()
            paths[source] = writer.folder
        return paths

    def discard(self) -> None:
        for writer in self.writers.values():
            writer.discard()


def generate_synthetic(
    teacher,
    tokenizer,
    prompts: Sequence,
    *,
    out_path: str | os.PathLike,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    chat_template=None,
    min_new_tokens: int = 1,
    dedupe: bool = True,
    engine: str = "slimlm",
    keep_topk: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    filters: bool = True,
    progress: bool = True,
    model_path: str | os.PathLike | None = None,
    engine_args: str | dict | None = None,
    server: str | None = None,
    server_model: str | None = None,
) -> SyntheticDataset:
    """Sample ``num_return_sequences`` generations per prompt from ``teacher`` and append them to ``out_path``.

    ``prompts``: texts, or (source, text) pairs (``slimlm.distill.prompts.mix_prompts``); a
    record keeps its source. ``chat_template``: None continues the raw prompt; True wraps it as a
    user turn with the tokenizer's chat template; a string is used as the template. An empty
    prompt samples freely from the BOS token. ``engine``: "slimlm" (``slimlm.distill.sampler``:
    every sample its own seeded stream, independent of the batching), "generate" (Hugging
    Face ``generate``, each batch seeded by its first prompt) or "vllm"
    (``slimlm.distill.vllm_sampler.VLLMSampler`` over ``model_path``, the teacher's Hugging Face
    folder, by default the one it was loaded from; ``engine_args``: more ``vllm.LLM`` arguments,
    a mapping or JSON text; with ``server``, ``VLLMServerSampler`` through a vLLM
    OpenAI-compatible server at that URL serving ``server_model``, by default ``model_path``),
    or an object with ``VLLMSampler``'s ``sample``.

    A record's ``text`` joins prompt and answer the way the teacher saw them
    (``slimlm.distill.prompts.joined_text``: the chat template's markup kept), and ``ids`` are
    their tokens (with the closing EOS when the answer ended). With ``filters``, degenerate
    samples are dropped (``slimlm.distill.prompts.degeneration``: empty, short, repetition
    loops) and an answer cut by ``max_new_tokens`` is trimmed to its last sentence end (dropped
    when it has none); the counts per reason are the dataset's ``counts``.

    ``keep_topk`` (with ``cache_dir``): the teacher's top-k log-probabilities of every position
    of each kept sample (temperature 1, the distribution it sampled from before temperature and
    top-p) go into a top-k cache per source, ``<cache_dir>/<source>``
    (``slimlm.distill.topk_cache``): distilling on this text then needs no teacher pass.
    Returns every record in the file (earlier runs' included).
    """
    from slimlm.distill.prompts import FilterCounts, degeneration, joined_text

    if isinstance(engine, str) and engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "vllm" and server:
        from slimlm.architectures import lm_head
        from slimlm.distill.vllm_sampler import VLLMServerSampler

        name = server_model or (os.fspath(model_path) if model_path is not None else teacher.config._name_or_path)
        engine = VLLMServerSampler(server, name, vocab_size=lm_head(teacher).weight.shape[0])
    elif engine == "vllm":
        from slimlm.distill.vllm_sampler import VLLMSampler, engine_kwargs, model_folder

        engine = VLLMSampler(model_folder(teacher, model_path), dtype=dtype, **engine_kwargs(engine_args))
    if (keep_topk is None) != (cache_dir is None):
        raise ValueError("keep_topk and cache_dir go together: the top-k rows are kept in a cache")
    if keep_topk is not None and keep_topk < 1:
        raise ValueError(f"keep_topk must be >= 1, got {keep_topk}")
    if keep_topk is not None:  # at most the vocabulary: then the whole distribution is kept
        from slimlm.architectures import lm_head

        keep_topk = min(keep_topk, lm_head(teacher).weight.shape[0])
    sources, texts = _sources_and_prompts(prompts)
    params = SamplingParams(max_new_tokens, temperature, top_p, num_return_sequences, seed)
    encoded = check_generation(teacher, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, num_return_sequences=num_return_sequences, batch_size=batch_size,
                               seed=seed, chat_template=chat_template, min_new_tokens=min_new_tokens)

    if os.path.exists(out_path):
        _drop_torn_tail(out_path)
        records = read_jsonl(out_path)
    else:
        records = []
    # A record names its prompt's place in the list (the same list on resume: its digest is part
    # of the run's inputs), so a prompt drawn twice (free sampling's, a cycled pool's) counts twice.
    done = {record["index"] if "index" in record else (record.get("source", "data"), record["prompt"])
            for record in records}
    seen = {" ".join(record["generation"].split()) for record in records}
    todo = [index for index, pair in enumerate(zip(sources, texts)) if index not in done and pair not in done]
    provenance = {
        "name": getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__,
        "fingerprint": model_fingerprint(teacher),
    }
    sampling = vars(params)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    counts, duplicates = FilterCounts(), 0
    was_training = teacher.training
    teacher.eval()
    caches = _Caches(teacher, tokenizer, os.fspath(cache_dir), keep_topk) if keep_topk else None
    if caches is not None:  # continue the caches: the records read back first, in file order
        for record in records:
            caches.add(record.get("source", "data"), record["ids"], None)

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if engine == "slimlm":
        drawn = _slimlm_sample(teacher, encoded, todo, batch_size=batch_size, eos_id=eos_id, seed=seed,
                               num_return_sequences=num_return_sequences, keep_topk=keep_topk, dtype=dtype,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    elif not isinstance(engine, str):
        drawn = _engine_sample(engine, encoded, todo, batch_size=batch_size, eos_id=eos_id, seed=seed,
                               num_return_sequences=num_return_sequences, keep_topk=keep_topk,
                               max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
    else:
        drawn = _hf_generate(teacher, encoded, todo, batch_size=batch_size, pad_id=pad_id, eos_id=eos_id, seed=seed,
                             num_return_sequences=num_return_sequences, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_p=top_p)
    bar = tqdm(total=len(todo) * num_return_sequences, desc="generating", unit="sample", disable=not progress)
    try:
        with open(out_path, "a", encoding="utf-8") as handle:
            for index, repeat, prompt_ids, new_ids, finish, rows in drawn:
                bar.update(1)
                prompt_ids, reason = list(prompt_ids), None
                if filters and finish == "length":  # cut by the limit: trimmed to its last sentence end
                    new_ids = new_ids[: _sentence_end(tokenizer, new_ids)]
                    reason = None if new_ids else "cut"
                generation = tokenizer.decode(new_ids, skip_special_tokens=True)
                key = " ".join(generation.split())
                if filters and reason is None:
                    reason = degeneration(new_ids, generation, "stop", min_new_tokens=min_new_tokens)
                if reason is None and (len(new_ids) < min_new_tokens or not key):
                    reason = "short" if key else "empty"
                if reason is None and dedupe and key in seen:
                    duplicates += 1
                    continue
                counts.add(reason)
                if reason is not None:
                    continue
                seen.add(key)
                ids = prompt_ids + new_ids + ([eos_id] if finish == "eos" and eos_id is not None else [])
                record = {
                    "index": index,
                    "source": sources[index],
                    "prompt": texts[index],
                    "generation": generation,
                    "text": joined_text(tokenizer, prompt_ids, ids[len(prompt_ids):]),
                    "ids": ids,
                    "sample": repeat,
                    "num_new_tokens": len(new_ids),
                    "finish": finish,
                    "teacher": provenance,
                    "sampling": sampling,
                }
                if caches is not None:
                    caches.add(sources[index], ids, rows)
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                records.append(record)
            handle.flush()
        paths = caches.finish() if caches is not None else {}
    except BaseException:
        if caches is not None:
            caches.discard()
        raise
    finally:
        bar.close()
        teacher.train(was_training)
    return SyntheticDataset(records, counts={**counts.as_record(), "duplicate": duplicates}, caches=paths)


def mix(classic: Sequence, synthetic: Sequence, *, synthetic_fraction: float, num_samples: int | None = None, seed: int = 0) -> list:
    """A shuffled mixture in which ``synthetic_fraction`` of the items come from ``synthetic``.

    ``num_samples`` defaults to the largest count reachable without repeating an item.
    Items are drawn without replacement within each source (deterministic for a seed).
    """
    if not 0.0 <= synthetic_fraction <= 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
    if num_samples is None:
        limits = []
        if synthetic_fraction > 0:
            limits.append(len(synthetic) / synthetic_fraction)
        if synthetic_fraction < 1:
            limits.append(len(classic) / (1.0 - synthetic_fraction))
        num_samples = int(min(limits))
    num_synthetic = round(num_samples * synthetic_fraction)
    num_classic = num_samples - num_synthetic
    if num_synthetic > len(synthetic) or num_classic > len(classic):
        raise ValueError(
            f"cannot draw {num_synthetic} synthetic and {num_classic} classic items "
            f"from {len(synthetic)} synthetic and {len(classic)} classic"
        )
    if num_samples == 0:
        raise ValueError("the mixture would be empty (no classic or synthetic items for this fraction)")
    generator = torch.Generator().manual_seed(seed)
    picked = [synthetic[i] for i in torch.randperm(len(synthetic), generator=generator)[:num_synthetic].tolist()]
    picked += [classic[i] for i in torch.randperm(len(classic), generator=generator)[:num_classic].tolist()]
    order = torch.randperm(len(picked), generator=generator).tolist()
    return [picked[i] for i in order]
