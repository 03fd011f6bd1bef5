"""Teacher-written text through vLLM (``engine: vllm``): the samples and the teacher's top-k
log-probs of every position from a ``vllm.LLM`` over the teacher's Hugging Face folder, in the
shapes ``slimlm.distill.sampler.sample`` yields (``Sample``), so the synthetic stage writes the
same records and the same top-k caches whichever engine sampled.

vLLM is an optional extra (``slimlm.distill.served.VLLM_EXTRA``), imported at first use. How its
answer maps onto a ``Sample``:

- Every sample is its own request with its own seed (``stream_seed``: the run's seed and the
  sample's stream number), so a sample does not depend on the batching, as with the slimlm
  sampler. The two engines draw different samples for one seed.
- The run stops at the tokenizer's EOS and nowhere else (``ignore_eos`` with ``stop_token_ids``
  [EOS]: the generation config's other stop tokens do not apply, as in the slimlm sampler). An
  answer that ends on EOS has it last in ``token_ids``; it is finish "eos" and is dropped from
  ``new_ids``. An answer that reaches ``max_tokens`` is finish "length".
- Rows (with ``keep_topk``): the prompt's positions come from ``prompt_logprobs`` and the
  generated ones from ``logprobs``, the top ``keep_topk`` of each by rank
  (``slimlm.distill.served.served_rows``' convention). vLLM's default ``logprobs_mode``,
  raw_logprobs, is log softmax of the raw logits, before temperature and top-p: the distribution
  the slimlm sampler keeps. Every position's entries must hold its actual token, which checks the
  alignment. vLLM gives no distribution after the last token of a "length" answer, so that row
  repeats the one before. It is never a training target, because a packed block masks the target
  that crosses a sequence end.
"""
from __future__ import annotations

import json
import os
import types
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import torch

from slimlm.distill.sampler import Sample
from slimlm.distill.served import VLLM_EXTRA, OpenAIServerEngine, PromptLogprobs, _token_id, served_rows, \
    top_k_entries
from slimlm.errors import InputError


def stream_seed(seed: int, stream: int) -> int:
    """The vLLM request seed of sample ``stream`` of a run seeded ``seed`` (a 63-bit mix of both)."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
    mixed ^= mixed >> 31
    return mixed % (1 << 63)


def engine_kwargs(text: str | dict | None) -> dict:
    """``engine_args`` (JSON text or a mapping) as ``vllm.LLM`` keyword arguments; InputError when
    it is not a JSON object."""
    if not text:
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"engine_args is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise InputError(f"engine_args must be a JSON object of vllm.LLM arguments, got {text!r}")
    return value


def _checked(prompts, streams) -> tuple[list[list[int]], list[int]]:
    """The prompts as lists of ints and each one's stream (default: its place); InputError for an
    empty prompt or a streams list of another length."""
    prompts = [[int(token) for token in prompt] for prompt in prompts]
    if streams is not None and len(streams) != len(prompts):
        raise InputError(f"streams names {len(streams)} streams for {len(prompts)} prompts")
    if any(not prompt for prompt in prompts):
        raise InputError("a prompt is empty: free sampling starts from the BOS token")
    return prompts, list(range(len(prompts))) if streams is None else list(streams)


def require_vllm():
    """The ``vllm`` module; InputError naming the extra when it cannot be imported."""
    try:
        import vllm
    except ImportError as error:
        raise InputError(f"engine vllm needs {VLLM_EXTRA}; importing it failed: {error}") from None
    return vllm


def model_folder(teacher, model_path: str | os.PathLike | None) -> str:
    """The teacher's Hugging Face folder for vLLM: ``model_path``, else the folder the teacher was
    loaded from; InputError when that is not a folder with a config.json."""
    path = os.fspath(model_path) if model_path is not None else str(getattr(teacher.config, "_name_or_path", "") or "")
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"engine vllm reads the teacher from a Hugging Face folder with a config.json; "
                         f"{path or 'the teacher'!r} is not one (save the teacher as a folder first, e.g. with "
                         "`slimlm convert`)")
    return path


class VLLMSampler:
    """A ``vllm.LLM`` over ``model_path`` that samples as ``slimlm.distill.sampler.sample`` does
    (module docstring). ``dtype``: a torch dtype or None (vLLM's auto). ``llm_kwargs``: more
    ``vllm.LLM`` arguments (``tensor_parallel_size``, ``max_model_len``, ``enforce_eager``, ...).
    The engine starts at the first ``sample``: the prompts are given as token ids and decoded by
    the caller, so vLLM needs no tokenizer (``skip_tokenizer_init``)."""

    def __init__(self, model_path: str | os.PathLike, *, dtype: torch.dtype | None = None, **llm_kwargs):
        self.model_path = os.fspath(model_path)
        self.dtype = dtype
        self.llm_kwargs = llm_kwargs
        self.llm = None
        self.max_logprobs = 0

    def _start(self, keep_topk: int | None):
        vllm = require_vllm()
        wanted = max(keep_topk or 0, 1)
        if self.llm is not None and wanted > self.max_logprobs:
            raise InputError(f"this vLLM engine was started for {self.max_logprobs} log-probs, asked for {wanted}")
        if self.llm is None:
            dtype = "auto" if self.dtype is None else str(self.dtype).removeprefix("torch.")
            kwargs = {"dtype": dtype, "max_logprobs": wanted, "skip_tokenizer_init": True, "seed": 0,
                      **self.llm_kwargs}
            self.llm = vllm.LLM(model=self.model_path, **kwargs)
            self.max_logprobs = kwargs["max_logprobs"]
        return vllm

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, eos_token_id: int | None, keep_topk: int | None = None, batch_size: int = 64,
               streams: Sequence[int] | None = None) -> Iterator[Sample]:
        """One ``Sample`` per prompt (token ids), ``batch_size`` requests per call of vLLM, each
        sample seeded by ``stream_seed(seed, its stream)``: ``streams[i]``, else i."""
        prompts, streams = _checked(prompts, streams)
        vllm = self._start(keep_topk)
        common = dict(max_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                      detokenize=False, ignore_eos=eos_token_id is not None,
                      stop_token_ids=[eos_token_id] if eos_token_id is not None else None,
                      logprobs=keep_topk, prompt_logprobs=keep_topk)
        for start in range(0, len(prompts), batch_size):
            chunk = range(start, min(start + batch_size, len(prompts)))
            params = [vllm.SamplingParams(seed=stream_seed(seed, streams[index]), **common) for index in chunk]
            outputs = self.llm.generate([{"prompt_token_ids": prompts[index]} for index in chunk], params,
                                        use_tqdm=False)
            for index, output in zip(chunk, outputs):
                yield sample_of(index, prompts[index], output, eos_token_id, keep_topk)


class VLLMServerSampler:
    """``VLLMSampler``'s sampling through a vLLM OpenAI-compatible server (``vllm serve MODEL
    --max-logprobs K``, in an environment of its own or on another machine) at ``base_url``,
    serving ``model``: one ``/v1/completions`` request per sample, the prompt as token ids,
    with vLLM's extra parameters (``seed``, ``prompt_logprobs``, ``ignore_eos``,
    ``stop_token_ids``, ``return_tokens_as_token_ids``), ``batch_size`` requests in flight (the
    server batches them). The answers map onto ``Sample`` as ``VLLMSampler``'s do (module
    docstring). ``vocab_size``: the teacher's LM-head rows. Connection errors and 5xx answers are
    retried as ``OpenAIServerEngine`` retries them."""

    def __init__(self, base_url: str, model: str, *, vocab_size: int, timeout: float = 600.0, retries: int = 4):
        self.engine = OpenAIServerEngine(base_url, model, vocab_size=vocab_size, timeout=timeout, retries=retries)
        self.identity = None

    def sample(self, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, eos_token_id: int | None, keep_topk: int | None = None, batch_size: int = 64,
               streams: Sequence[int] | None = None) -> Iterator[Sample]:
        """As ``VLLMSampler.sample``."""
        prompts, streams = _checked(prompts, streams)
        if self.identity is None:
            self.identity = self.engine.start(keep_topk or 1)
        # log-probs of at least one entry: the generated tokens come back as ids only with them
        common = {"model": self.engine.model, "max_tokens": max_new_tokens, "temperature": float(temperature),
                  "top_p": float(top_p), "n": 1, "logprobs": keep_topk or 1, "return_tokens_as_token_ids": True,
                  "add_special_tokens": False, "ignore_eos": eos_token_id is not None,
                  **({"stop_token_ids": [eos_token_id]} if eos_token_id is not None else {}),
                  **({"prompt_logprobs": keep_topk} if keep_topk else {})}

        def request(index: int):
            answer = self.engine._request("/v1/completions", {**common, "prompt": prompts[index],
                                                               "seed": stream_seed(seed, streams[index])})
            (choice,) = answer.get("choices") or [None]
            if choice is None or not choice.get("logprobs"):
                raise ValueError(f"prompt {index}: {self.engine.base_url} answered without log-probs: {answer!r:.300}")
            steps = choice["logprobs"]["top_logprobs"]
            generated = [_token_id(token) for token in choice["logprobs"]["tokens"]]
            output = types.SimpleNamespace(prompt_logprobs=choice.get("prompt_logprobs"), outputs=[
                types.SimpleNamespace(token_ids=generated, logprobs=steps, finish_reason=choice.get("finish_reason"))])
            return sample_of(index, prompts[index], output, eos_token_id, keep_topk)

        with ThreadPoolExecutor(max_workers=batch_size) as pool:
            for start in range(0, len(prompts), batch_size):
                yield from pool.map(request, range(start, min(start + batch_size, len(prompts))))


def sample_of(index: int, prompt: list[int], output, eos_token_id: int | None, keep_topk: int | None) -> Sample:
    """The ``Sample`` of one vLLM ``RequestOutput`` (module docstring); ValueError when its
    log-probs do not line up with its tokens."""
    answer = output.outputs[0]
    generated = [int(token) for token in answer.token_ids]
    finish = "eos" if generated and eos_token_id is not None and generated[-1] == eos_token_id else "length"
    new_ids = generated[:-1] if finish == "eos" else generated
    if finish == "length" and answer.finish_reason not in ("length", None):
        raise ValueError(f"prompt {index}: vLLM stopped ({answer.finish_reason}) on a token other than EOS")
    if not keep_topk:
        return Sample(index, prompt, new_ids, finish)
    where = f"prompt {index}"
    steps = list(answer.logprobs or [])
    if not generated or len(steps) != len(generated):
        raise ValueError(f"{where}: vLLM returned log-probs for {len(steps)} of {len(generated)} generated tokens")
    logprobs, indices = served_rows(torch.tensor(prompt), PromptLogprobs(output.prompt_logprobs, steps[0]), keep_topk,
                                    where)
    rows_p, rows_i = [logprobs], [indices]
    for position in range(1, len(generated)):
        entries = steps[position]
        if generated[position] not in {_token_id(key) for key in entries}:
            raise ValueError(f"{where}, generated position {position}: the token {generated[position]} is not among "
                             "vLLM's entries there")
        values, ids = top_k_entries(entries, keep_topk, f"{where}, generated position {position}")
        rows_p.append(torch.tensor([values], dtype=torch.float32))
        rows_i.append(torch.tensor([ids], dtype=torch.int64))
    if generated[0] not in {_token_id(key) for key in steps[0]}:
        raise ValueError(f"{where}: the first generated token {generated[0]} is not among vLLM's entries there")
    logprobs, indices = torch.cat(rows_p), torch.cat(rows_i)
    needed = len(prompt) + len(new_ids)
    if logprobs.shape[0] < needed:  # a "length" answer: no distribution after its last token
        logprobs = torch.cat([logprobs, logprobs[-1:].expand(needed - logprobs.shape[0], -1)])
        indices = torch.cat([indices, indices[-1:].expand(needed - indices.shape[0], -1)])
    return Sample(index, prompt, new_ids, finish, logprobs[:needed].contiguous(), indices[:needed].contiguous())
