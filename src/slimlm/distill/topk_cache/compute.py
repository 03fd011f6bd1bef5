"""Computing a cache with an in-process model: ``teacher_topk`` (a batch's top-k log-probs, logits
made in row chunks) and ``cache_teacher_topk`` (a dataset through it into ``TopKCacheWriter``)."""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

from slimlm.architectures import lm_head
from slimlm.distill.topk_cache.format import teacher_identity
from slimlm.distill.topk_cache.writer import TopKCacheWriter, token_sequences
from slimlm.losses import last_hidden_state
from slimlm.losses.chunked import HeadGemms, pick_chunk_size


@torch.no_grad()
def teacher_topk(model, input_ids: torch.Tensor, k: int, temperature: float = 1.0, chunk_size: int | None = None):
    """(B, T, k) fp32 top-k log softmax(logits / τ) and int64 indices, logits made in fp32 row chunks."""
    gemms = HeadGemms(lm_head(model), None)
    hidden = last_hidden_state(model, input_ids)
    rows = hidden.reshape(-1, hidden.shape[-1])
    vocab = gemms.head.weight.shape[0]
    step = chunk_size or pick_chunk_size(rows.shape[0], vocab, rows.device)
    values, indices = [], []
    for start in range(0, rows.shape[0], step):
        logits = gemms.logits(gemms.operand(rows[start:start + step]))
        top = torch.log_softmax(logits.div_(temperature), dim=-1).topk(k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
    shape = (*hidden.shape[:-1], k)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)


def cache_teacher_topk(
    model,
    dataset: Iterable,
    k: int,
    path: str | os.PathLike,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
    shard_tokens: int | Sequence[int] = 1 << 20,
    chunk_size: int | None = None,
    prob_bits: int = 6,
    power: float = 0.3,
    tokenizer=None,
    shards: str | None = None,
) -> list[str]:
    """Runs ``model`` over ``dataset`` and writes its top-k log-probs per token to ``path``.

    ``dataset`` yields token-id sequences (1-D tensors, lists or dicts with ``input_ids``);
    consecutive sequences of equal length run as one batch of up to ``batch_size``. A part
    closes after ``shard_tokens`` tokens, or, given a list, exactly after shard_tokens[i]
    tokens for part i (the sizes of the token shards it is aligned with; a sequence may not
    cross one). ``prob_bits`` and ``power`` are the codec's (``TopKCodec``); ``tokenizer`` and
    ``shards`` (the token-shard manifest's digest) are recorded so that a reader can refuse a
    cache of another tokenizer or shard set. Returns the records files' paths. An unfinished
    cache of the same run in ``path`` is continued; a finished one is refused. k in [1, V]; τ > 0.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    device = next(model.parameters()).device
    with TopKCacheWriter(path, k=k, vocab_size=lm_head(model).weight.shape[0], teacher=teacher_identity(model),
                         temperature=temperature, shard_tokens=shard_tokens, prob_bits=prob_bits, power=power,
                         tokenizer=tokenizer, shards=shards) as writer:

        def run_batch(batch: list[torch.Tensor]):
            logprobs, indices = teacher_topk(model, torch.stack(batch).to(device), k, temperature, chunk_size)
            for ids, lp, ix in zip(batch, logprobs.cpu(), indices.cpu()):
                writer.add(ids, lp, ix)

        was_training = model.training
        model.eval()
        try:
            batch: list[torch.Tensor] = []
            for ids in token_sequences(dataset):
                if not writer.needs(ids):
                    continue
                if batch and (len(batch) == batch_size or ids.numel() != batch[0].numel()):
                    run_batch(batch)
                    batch = []
                batch.append(ids)
            if batch:
                run_batch(batch)
        finally:
            model.train(was_training)
        return writer.finish()
