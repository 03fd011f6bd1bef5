"""Teacher-written text, fast: batched top-p sampling from a Hugging Face causal LM that keeps the
teacher's top-k log-probs of every position, so distilling on the text needs no second teacher pass.

``sample`` runs the model's own forward (any causal LM: Llama, Qwen2, Mistral, ...) with left
padding (attention mask + position ids) and a KV cache, and differs from ``model.generate`` where
the time goes on a CPU:

- prompts are sorted by length and batched with their neighbours, so little of a batch is padding;
- the prefix all prompts of a batch share (a chat template's system prompt) goes through the model
  once and its keys and values are copied to every row; the rests follow, left-padded (only for
  models whose layers all attend to the full context: a sliding window would count the padding);
- a batch drops its finished rows from the KV cache, so that rows that hit EOS stop costing compute;
- nucleus sampling looks at the ``NUCLEUS_CANDIDATES`` most likely tokens (``torch.topk``), more
  of them for a row whose candidates hold less than ``top_p`` of the mass, and sorts the whole
  vocabulary only for a row that needs it: exact, and a small top-k instead of a full sort for
  nearly every row and step;
- with sdpa attention on CPU, attention over short sequences (a decode step's one query per row, short
  prompts) is two batched matmuls over the KV groups (``decode_attention``), not the fused kernel
  that is slow for them on CPU;
- in bfloat16 on a CPU with native bf16 oneDNN kernels, every Linear's weight is reordered once
  into the GEMM's layout (``_PackedLinear``; bit-identical outputs) instead of on every call.

All of it happens on a private copy of the model's modules (sharing its weights unless ``dtype``
casts them), so the caller's model, its config and its train/eval mode are left as they are.

Randomness is per prompt: a prompt draws its j-th token with the j-th uniform of a generator seeded
from (seed, its token ids, its stream number: by default how many identical prompts precede it in
the list, else the caller's ``streams``), so its sample depends on the seed and the prompt, not on
the batch size, the other prompts or their order, nor on which subset of prompts a resumed run
still has to do (up to the rounding of batched matmuls, which can in principle flip a draw that
lands within rounding of a boundary between two tokens).
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache, DynamicLayer

from slimlm.errors import InputError

# How many of a row's most likely tokens nucleus sampling looks at: the first size for every
# row, each next one for the rows whose nucleus the previous did not hold, then a full sort.
NUCLEUS_CANDIDATES = (64, 1024)
# A batch copies its KV cache without its finished rows once they are this fraction of its rows.
COMPACT_FRACTION = 0.125
# The attention implementation name under which ``decode_attention`` is registered, and the most
# scores (batch × heads × queries × keys) it computes itself rather than through fused sdpa.
DECODE_ATTENTION = "slimlm_decode"
MATH_ATTENTION_SCORES = 1 << 24
# The most logits (rows × positions × vocabulary) one prefill forward makes when the top-k of every
# prompt position is kept; longer prompts are prefilled in column chunks.
PREFILL_LOGITS = 1 << 26


@dataclass
class Sample:
    """One prompt's continuation. ``topk_logprobs``/``topk_indices`` (with ``keep_topk``) are
    [len(prompt_ids) + len(new_ids), k]: row t holds the teacher's k largest log-probs (log_softmax
    of its raw logits, before temperature and top-p; float32, descending) and their token ids
    (int64) for the token at t + 1 of prompt_ids + new_ids, the top-k cache's convention. The last
    row is the distribution after the last new token: the one EOS was drawn from when ``finish``
    is "eos", the one the next token would be drawn from when it is "length"."""

    index: int
    prompt_ids: list[int]
    new_ids: list[int]
    finish: str
    topk_logprobs: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None


def sample(model, prompts: Sequence[list[int]], *, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.95,
           seed: int = 0, batch_size: int = 32, eos_token_id: int | None, keep_topk: int | None = None,
           dtype: torch.dtype | None = None, progress: bool = False,
           streams: Sequence[int] | None = None) -> Iterator[Sample]:
    """Samples a continuation of every prompt (token ids) from ``model`` and yields one ``Sample``
    per prompt, in the order they finish (``Sample.index`` is the prompt's position in ``prompts``).

    Each new token is drawn from softmax(logits / temperature) restricted to its top-p nucleus (the
    most likely tokens whose probabilities first sum to >= top_p, as transformers' top-p keeps).
    A row stops at ``eos_token_id`` (finish "eos", the EOS not in ``new_ids``) or after
    ``max_new_tokens`` tokens (finish "length"). ``keep_topk``: also keep the teacher's top-k
    log-probs of every position (see ``Sample``). ``batch_size`` prompts run together, prompts of
    similar length batched together. ``dtype``: run the forward in a copy of the model cast to it
    (None: the model as given). The same seed gives every prompt the same sample whatever the
    batching (see the module docstring). ``streams``: each prompt's stream number in place of its
    count of identical prompts before it (a caller that samples a subset of a longer list, e.g. a
    resumed run, passes the prompts' places in the whole list). Arguments are checked when
    ``sample`` is called, before any sample is drawn (InputError naming the problem); the samples
    come from a copy of the model in eval mode (the caller's model is not changed).
    """
    prompts = [[int(token) for token in prompt] for prompt in prompts]
    _check(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
           batch_size=batch_size, keep_topk=keep_topk, dtype=dtype)
    order = sorted(range(len(prompts)), key=lambda index: (len(prompts[index]), index))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    settings = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p), seed=seed,
                    eos_token_id=eos_token_id, keep_topk=keep_topk)
    if streams is not None and len(streams) != len(prompts):
        raise InputError(f"streams names {len(streams)} streams for {len(prompts)} prompts")
    return _samples(model, prompts, batches, settings, dtype, progress, streams)


def _check(model, prompts, *, max_new_tokens, temperature, top_p, seed, batch_size, keep_topk, dtype) -> None:
    if not prompts:
        raise InputError("no prompts given")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not temperature > 0:
        raise InputError(f"temperature must be > 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {seed!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if keep_topk is not None and (not isinstance(keep_topk, int) or not 1 <= keep_topk <= vocab):
        raise InputError(f"keep_topk must be None or an int in [1, {vocab}] (the vocabulary), got {keep_topk!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise InputError(f"prompt {index} is empty")
        if context is not None and len(prompt) + max_new_tokens > context:
            raise InputError(f"prompt {index} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                             f"exceeds the model's max_position_embeddings of {context}")


def _samples(model, prompts, batches, settings, dtype, progress, streams=None) -> Iterator[Sample]:
    runner = _runner(model, dtype)
    if streams is None:
        seen: dict[tuple[int, ...], int] = {}
        streams = []
        for prompt in prompts:
            streams.append(seen.setdefault(tuple(prompt), 0))
            seen[tuple(prompt)] += 1
    streams = [int(stream) for stream in streams]
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress)
    try:
        with torch.no_grad():
            for indices in batches:
                for drawn in _sample_batch(runner, prompts, streams, indices, **settings):
                    bar.update(1)
                    yield drawn
    finally:
        bar.close()


def _runner(model, dtype):
    """The model to sample with: a copy of ``model``'s modules and config in eval mode that shares
    its weights (with ``dtype``: holds its floating parameters cast to it; buffers such as rotary
    frequencies keep theirs, as a checkpoint loaded in that dtype has them), its Linear layers
    prepacked where that is exact (``_PackedLinear``) and, for sdpa models on CPU, ``decode_attention``."""
    cast = dtype is not None and dtype != model.dtype
    memo = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if cast and isinstance(tensor, torch.nn.Parameter) and tensor.is_floating_point():
            memo[id(tensor)] = torch.nn.Parameter(tensor.detach().to(dtype), requires_grad=False)
        else:
            memo[id(tensor)] = tensor
    runner = copy.deepcopy(model, memo).eval()
    if runner.device.type == "cpu" and getattr(runner.config, "_attn_implementation", None) == "sdpa":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(DECODE_ATTENTION, decode_attention)
        AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
        runner.set_attn_implementation(DECODE_ATTENTION)
    for module in list(runner.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, _PackedLinear.of(child))
    return runner


class _PackedLinear(torch.nn.Module):
    """A bfloat16 ``nn.Linear`` whose weight oneDNN has reordered once into its GEMM layout (a plain
    bf16 CPU linear reorders it on every call): the same kernel, bit-identical outputs.
    ``weight`` and ``bias`` stay, for code that reads them."""

    def __init__(self, linear: torch.nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.packed, self.bias, "none", [], "")

    @classmethod
    def of(cls, linear: torch.nn.Linear) -> torch.nn.Module:
        """The packed form of ``linear`` where it computes exactly what ``linear`` does (bf16 on a CPU
        with native bf16 oneDNN kernels, checked on a few rows), else ``linear`` itself."""
        weight = linear.weight
        if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
            return linear
        try:
            if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
                return linear
            packed = cls(linear, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64))
            probe = torch.randn(2, 3, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
            exact = torch.equal(packed(probe), torch.nn.functional.linear(probe, weight, linear.bias))
        except (AttributeError, RuntimeError):  # a torch without these oneDNN ops
            return linear
        return packed if exact else linear


def _sample_batch(model, prompts, streams, indices, *, max_new_tokens, temperature, top_p, seed, eos_token_id,
                  keep_topk) -> Iterator[Sample]:
    """The samples of one batch of prompts (``indices``), yielded as their rows finish.

    Cache slot layout: the prompts' shared prefix (``shared`` tokens, computed once for the batch),
    then each prompt's rest left-padded to the longest, then one slot per new token.
    """
    device = model.get_output_embeddings().weight.device
    batch_prompts = [prompts[index] for index in indices]
    count = len(indices)
    lengths = torch.tensor([len(prompt) for prompt in batch_prompts], device=device)
    width = int(lengths.max())
    cache = DynamicCache(config=model.config)
    full_attention = bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
    shared = _shared_prefix(batch_prompts) if count > 1 and full_attention else 0
    rest_width = width - shared
    input_ids = torch.zeros(count, rest_width, dtype=torch.long)
    attention_mask = torch.zeros(count, width + max_new_tokens, dtype=torch.long)
    attention_mask[:, :shared] = 1
    for row, prompt in enumerate(batch_prompts):
        input_ids[row, rest_width - (len(prompt) - shared):] = torch.tensor(prompt[shared:])
        attention_mask[row, width - (len(prompt) - shared):width] = 1
    uniforms = torch.stack([_uniforms(seed, prompts[index], streams[index], max_new_tokens)
                            for index in indices]).to(device)
    attention_mask = attention_mask.to(device)
    positions = (attention_mask[:, :width].cumsum(-1) - 1).clamp_(min=0)
    empty = torch.empty(1, 0, keep_topk or 0, device=device)
    prefix_topk = (empty, empty.long())
    if shared:
        # Once for the batch, then copied to every row: the slots hold the same keys and values.
        _, prefix_topk = _prefill(model, cache, torch.tensor([batch_prompts[0][:shared]], device=device),
                                  attention_mask[:1, :shared], positions[:1, :shared], keep_topk)
        cache.reorder_cache(torch.zeros(count, dtype=torch.long, device=device))
    last_logits, rest_topk = _prefill(model, cache, input_ids.to(device), attention_mask[:, :width],
                                      positions[:, shared:], keep_topk)
    if keep_topk:
        # Column c of the rest: the distribution after its token; the last column's, the first new
        # token's, is column 0 of ``new_topk``.
        new_topk = (torch.empty(count, max_new_tokens + 1, keep_topk, device=device),
                    torch.empty(count, max_new_tokens + 1, keep_topk, dtype=torch.long, device=device))
    new_ids = torch.zeros(count, max_new_tokens, dtype=torch.long, device=device)
    rows = torch.arange(count, device=device)  # the batch row of each cache row
    alive = torch.ones(count, dtype=torch.bool, device=device)  # per cache row

    def finished(row: int, new_count: int, finish: str) -> Sample:
        index = indices[row]
        prompt = prompts[index]
        topk = [None, None]
        if keep_topk:
            rest = slice(rest_width - (len(prompt) - shared), -1)
            topk = [torch.cat([prefix[0], after_rest[row, rest], after_new[row, :new_count + 1]]).cpu()
                    for prefix, after_rest, after_new in zip(prefix_topk, rest_topk, new_topk)]
        return Sample(index, list(prompt), new_ids[row, :new_count].tolist(), finish, *topk)

    def forward(step: int) -> torch.Tensor:
        """Feeds new token ``step`` of every cache row; the logits of its next token, float32."""
        attention_mask[:, width + step] = 1
        output = model(input_ids=new_ids[rows, step, None], attention_mask=attention_mask[:, :width + step + 1],
                       position_ids=(lengths[rows] + step)[:, None], past_key_values=cache, use_cache=True)
        return output.logits[:, -1].float()

    for step in range(max_new_tokens):
        live = alive.nonzero().squeeze(1)
        live_rows = rows[live]
        logits = last_logits if len(live) == len(rows) else last_logits[live]
        tokens, topk = _draw(logits, uniforms[live_rows, step], temperature, top_p, keep_topk)
        new_ids[live_rows, step] = tokens
        if keep_topk:
            new_topk[0][live_rows, step], new_topk[1][live_rows, step] = topk
        if eos_token_id is not None:
            ended = tokens == eos_token_id
            alive[live[ended]] = False
            for row in live_rows[ended].tolist():
                yield finished(row, step, "eos")
        if not alive.any():
            return
        if step == max_new_tokens - 1:
            break
        dead = int((~alive).sum())
        if dead and dead >= COMPACT_FRACTION * len(rows):
            keep = alive.nonzero().squeeze(1)
            cache.reorder_cache(keep)
            rows, attention_mask, alive = rows[keep], attention_mask[keep], alive[keep]
        last_logits = forward(step)

    live_rows = rows[alive]
    if keep_topk:
        # The distribution after each row's last token, so that every row of the top-k is the teacher's.
        new_topk[0][live_rows, max_new_tokens], new_topk[1][live_rows, max_new_tokens] = _topk_log_probs(
            forward(max_new_tokens - 1)[alive], keep_topk)
    for row in live_rows.tolist():
        yield finished(row, max_new_tokens, "length")


def _shared_prefix(prompts: list[list[int]]) -> int:
    """The length of the prefix all ``prompts`` share, leaving every prompt at least one more token."""
    return min(len(os.path.commonprefix(prompts)), min(map(len, prompts)) - 1)


def _prefill(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor,
             keep_topk: int | None):
    """Feeds ``input_ids`` (B, n) into the cache slots after those it holds (``attention_mask``
    covers both), in column chunks whose logits stay under PREFILL_LOGITS values when every
    position's top-k is kept. Returns the float32 logits after the last column and, with
    ``keep_topk``, the (B, n, k) top-k log-probs and indices after every column."""
    rows, width = input_ids.shape
    held = attention_mask.shape[1] - width
    vocab = model.get_output_embeddings().weight.shape[0]
    columns = max(1, PREFILL_LOGITS // (rows * vocab)) if keep_topk else width
    parts = []
    for start in range(0, width, columns):
        end = min(width, start + columns)
        output = model(input_ids=input_ids[:, start:end], attention_mask=attention_mask[:, :held + end],
                       position_ids=positions[:, start:end], past_key_values=cache, use_cache=True,
                       logits_to_keep=0 if keep_topk else 1)
        if keep_topk:
            parts.append(_topk_log_probs(output.logits, keep_topk))
    topk = tuple(torch.cat(part, dim=1) for part in zip(*parts)) if keep_topk else None
    return output.logits[:, -1].float(), topk


def _uniforms(seed: int, prompt: list[int], stream: int, count: int) -> torch.Tensor:
    """The ``count`` uniforms in [0, 1) a prompt draws its tokens with: a generator of its own,
    seeded by a hash of (seed, the prompt's ids, its stream number), so that no two prompts with
    different streams share one and a prompt's stream does not depend on its position."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{','.join(map(str, prompt))}".encode(), digest_size=8).digest()
    return torch.rand(count, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))


def _topk_log_probs(logits: torch.Tensor, k: int, chunk_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., k) float32 top-k of log_softmax(logits) and their int64 indices, in row chunks."""
    rows = logits.reshape(-1, logits.shape[-1])
    values = torch.empty(rows.shape[0], k, device=logits.device)
    indices = torch.empty(rows.shape[0], k, dtype=torch.long, device=logits.device)
    for start in range(0, rows.shape[0], chunk_rows):
        chunk = rows[start:start + chunk_rows].float()
        top = chunk.topk(k, dim=-1)
        torch.sub(top.values, torch.logsumexp(chunk, dim=-1, keepdim=True), out=values[start:start + chunk_rows])
        indices[start:start + chunk_rows] = top.indices
    return values.reshape(*logits.shape[:-1], k), indices.reshape(*logits.shape[:-1], k)


def _draw(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float, keep_topk: int | None):
    """One token per row of ``logits`` (R, V float32) by inverse transform sampling with ``uniforms``
    (R,) over the top-p nucleus of softmax(logits / temperature), and (with ``keep_topk``) the
    row's top-k log_softmax(logits) and indices.

    The nucleus of a row with probabilities sorted p_1 >= p_2 >= ... is its first n tokens, n the
    least with p_1 + ... + p_n >= top_p; token j of it is drawn when
    (p_1 + ... + p_{j-1}) <= u (p_1 + ... + p_n) < (p_1 + ... + p_j). The sorted prefix comes from the
    row's ``NUCLEUS_CANDIDATES[0]`` largest logits, for a row whose candidates fall short of top_p
    from the next size's, and from a sort of its whole vocabulary after the last. With top_p = 1
    (no nucleus) the whole vocabulary is used in index order.
    """
    vocab = logits.shape[-1]
    top_values, top_indices = logits.topk(min(vocab, max(NUCLEUS_CANDIDATES[0], keep_topk or 0)), dim=-1)
    peak = top_values[:, :1]
    kept = None
    if keep_topk:
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        kept = (top_values[:, :keep_topk] - log_norm, top_indices[:, :keep_topk])
    if keep_topk and temperature == 1.0:
        log_mass = log_norm - peak
    else:
        log_mass = (logits - peak).div_(temperature).exp_().sum(-1, keepdim=True).log_()

    def probs(values: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """softmax(logits / temperature) at ``values`` (logits of the rows ``pending``, None: all)."""
        shift = (peak, log_mass) if pending is None else (peak[pending], log_mass[pending])
        return (values - shift[0]).div_(temperature).sub_(shift[1]).exp_()

    if top_p >= 1:
        order = torch.arange(vocab, device=logits.device).expand(logits.shape[0], vocab)
        return _pick(probs(logits, None).cumsum_(-1), order, uniforms, top_p), kept
    cumulative = probs(top_values, None).cumsum_(-1)
    covered = cumulative[:, -1] >= top_p
    if covered.all():
        return _pick(cumulative, top_indices, uniforms, top_p), kept
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    tokens[covered] = _pick(cumulative[covered], top_indices[covered], uniforms[covered], top_p)
    pending = (~covered).nonzero().squeeze(1)
    for width in (*NUCLEUS_CANDIDATES[1:], vocab):
        width = min(width, vocab)
        if width == vocab:
            values, candidates = logits[pending].sort(dim=-1, descending=True)
        else:
            values, candidates = logits[pending].topk(width, dim=-1)
        cumulative = probs(values, pending).cumsum_(-1)
        covered = (cumulative[:, -1] >= top_p) | (width == vocab)
        tokens[pending[covered]] = _pick(cumulative[covered], candidates[covered], uniforms[pending[covered]], top_p)
        pending = pending[~covered]
        if not len(pending):
            break
    return tokens, kept


def _pick(cumulative: torch.Tensor, token_ids: torch.Tensor, uniforms: torch.Tensor, top_p: float) -> torch.Tensor:
    """The token whose cumulative-probability interval holds u × (mass of the nucleus), per row;
    the nucleus is the prefix that first reaches ``top_p`` (all of it when top_p is 1)."""
    if top_p < 1:
        size = (cumulative < top_p).sum(-1, keepdim=True).add_(1).clamp_(max=cumulative.shape[-1])
    else:
        size = torch.full((cumulative.shape[0], 1), cumulative.shape[-1], device=cumulative.device)
    mass = cumulative.gather(-1, size - 1)
    choice = torch.searchsorted(cumulative, uniforms[:, None].to(cumulative.dtype) * mass, right=True)
    return token_ids.gather(-1, torch.minimum(choice, size - 1)).squeeze(-1)


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs):
    """transformers' sdpa attention for sampling on CPU: softmax(q k^T · scaling + mask) v computed
    per KV group as two batched matmuls in the model's dtype with the softmax in float32 (as eager
    attention does, without repeating K/V per query head). The fused sdpa kernel is slow on CPU
    for one query per row (a decode step) and for short prompts. Long prompts (whose scores would
    take much memory), causal calls without a mask (sdpa's own causal kernel), dropout and
    position biases go to transformers' sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, queries, head_dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    if (batch * heads * queries * keys > MATH_ATTENTION_SCORES or (attention_mask is None and queries > 1) or dropout
            or kwargs.get("position_bias") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, group * queries, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float().mul_(head_dim ** -0.5 if scaling is None else scaling)
    scores = scores.view(batch, kv_heads, group, queries, keys)
    if attention_mask is not None:
        mask = attention_mask[:, :, None, :, :keys]
        if mask.dtype == torch.bool:
            # The float minimum, not -inf: a padding query that sees no key gets finite weights.
            scores.masked_fill_(~mask, torch.finfo(torch.float32).min)
        else:
            scores.add_(mask)
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, group * queries, keys)
    output = torch.matmul(weights, value).view(batch, heads, queries, head_dim)
    return output.transpose(1, 2).contiguous(), None
