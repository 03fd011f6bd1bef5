"""Offline sparse teacher: a causal LM's top-k log-probabilities per token, on disk.

Layout of a cache folder: ``index.json`` (format, k, temperature, teacher identity, the shard
list) and shards ``shard-00000.safetensors``, ... each holding, for the sequences it covers:

- ``token_ids``        int32 (T,)      the sequences' tokens, concatenated
- ``sequence_offsets`` int64 (S + 1,)  sequence s is rows offsets[s]:offsets[s + 1]
- ``topk_logprobs``    fp32  (T, k)    log softmax(teacher logits / τ), the k largest, descending
- ``topk_indices``     int32 (T, k)    their vocabulary ids

Row t of a sequence is the teacher's distribution over the token at t + 1 (the logits at
position t, as Hugging Face computes them), so a loss pairs row t with the student's
logits at t and ignores the last row. Each shard repeats the metadata in its safetensors
header. Only safetensors and JSON are read back, never pickles.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slimlm import outputs
from slimlm.architectures import lm_head
from slimlm.losses import last_hidden_state
from slimlm.losses.chunked import HeadGemms, pick_chunk_size

FORMAT = "slimlm.teacher_topk/1"
INDEX_FILE = "index.json"
TENSORS = ("token_ids", "sequence_offsets", "topk_logprobs", "topk_indices")


def _sequences(dataset: Iterable) -> Iterator[torch.Tensor]:
    """Token-id sequences from items that are 1-D tensors, lists of ints or dicts with ``input_ids``."""
    for position, item in enumerate(dataset):
        ids = item["input_ids"] if isinstance(item, dict) else item
        ids = torch.as_tensor(ids)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.numel() == 0:
            raise ValueError(f"dataset item {position}: expected a non-empty 1-D sequence of token ids, got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        yield ids.long()


def teacher_identity(model) -> dict:
    """What identifies a teacher in a cache: name or path, model type, vocabulary, revision, dtype."""
    config = model.config
    return {
        "teacher": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "teacher_model_type": str(getattr(config, "model_type", "")),
        "teacher_vocab_size": str(lm_head(model).weight.shape[0]),
        "teacher_revision": str(getattr(config, "_commit_hash", None) or ""),
        "teacher_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


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
    shard_tokens: int = 1 << 20,
    chunk_size: int | None = None,
) -> list[str]:
    """Runs ``model`` over ``dataset`` and writes its top-k log-probs per token to ``path``.

    ``dataset`` yields token-id sequences (1-D tensors, lists or dicts with ``input_ids``);
    consecutive sequences of equal length run as one batch of up to ``batch_size``. Shards
    close after ``shard_tokens`` tokens. Returns the shard paths. The folder must not hold a
    cache already. k must be in [1, V]; τ > 0.
    """
    vocab = lm_head(model).weight.shape[0]
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the teacher's vocabulary), got {k!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if batch_size < 1 or shard_tokens < 1:
        raise ValueError(f"batch_size and shard_tokens must be >= 1, got {batch_size} and {shard_tokens}")
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, INDEX_FILE)):
        raise ValueError(f"{os.path.join(path, INDEX_FILE)} exists: {path} already holds a teacher cache")
    device = next(model.parameters()).device
    metadata = {"format": FORMAT, "k": str(k), "temperature": repr(float(temperature)), **teacher_identity(model)}

    shards: list[dict] = []
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    pending_tokens = 0

    def flush():
        nonlocal pending, pending_tokens
        if not pending:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        lengths = torch.tensor([ids.numel() for ids, _, _ in pending])
        tensors = {
            "token_ids": torch.cat([ids for ids, _, _ in pending]).to(torch.int32),
            "sequence_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "topk_logprobs": torch.cat([lp for _, lp, _ in pending]).float().contiguous(),
            "topk_indices": torch.cat([ix for _, _, ix in pending]).to(torch.int32).contiguous(),
        }
        save_file(tensors, os.path.join(path, name),
                  metadata={**metadata, "num_sequences": str(len(pending)), "num_tokens": str(pending_tokens)})
        shards.append({"file": name, "num_sequences": len(pending), "num_tokens": pending_tokens})
        pending, pending_tokens = [], 0

    def run(batch: list[torch.Tensor]):
        nonlocal pending_tokens
        logprobs, indices = teacher_topk(model, torch.stack(batch).to(device), k, temperature, chunk_size)
        for ids, lp, ix in zip(batch, logprobs.cpu(), indices.cpu()):
            pending.append((ids, lp, ix))
            pending_tokens += ids.numel()
            if pending_tokens >= shard_tokens:
                flush()

    was_training = model.training
    model.eval()
    try:
        batch: list[torch.Tensor] = []
        for ids in _sequences(dataset):
            if batch and (len(batch) == batch_size or ids.numel() != batch[0].numel()):
                run(batch)
                batch = []
            batch.append(ids)
        if batch:
            run(batch)
        flush()
    finally:
        model.train(was_training)
    if not shards:
        raise ValueError("dataset yielded no sequences; nothing was cached")
    # The index is what makes the folder a cache: written last, atomically, once every shard is.
    outputs.write_text(os.path.join(path, INDEX_FILE), json.dumps({**metadata, "shards": shards}, indent=1))
    return [os.path.join(path, shard["file"]) for shard in shards]


class TeacherTopKCache:
    """Streams a cache written by ``cache_teacher_topk``, one shard in memory at a time.

    Iterating yields, per sequence, ``{"input_ids": (T,) int64, "topk_logprobs": (T, k) fp32,
    "topk_indices": (T, k) int64}``. Every shard is checked against the index (format, k,
    temperature, teacher) and its tensors against each other before anything is yielded;
    a mismatch is a ValueError naming the file and the field.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise ValueError(f"{index_path} not found: {self.path} is not a teacher top-k cache")
        with open(index_path) as handle:
            self.index = json.load(handle)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_path}: field 'format' is {self.index.get('format')!r}, expected {FORMAT!r}")
        for field in ("k", "temperature", "teacher", "teacher_vocab_size", "shards"):
            if field not in self.index:
                raise ValueError(f"{index_path}: missing field {field!r}")
        self.k = int(self.index["k"])
        self.temperature = float(self.index["temperature"])
        self.teacher = self.index["teacher"]
        self.vocab_size = int(self.index["teacher_vocab_size"])

    @property
    def num_sequences(self) -> int:
        return sum(int(shard["num_sequences"]) for shard in self.index["shards"])

    def __len__(self) -> int:
        return self.num_sequences

    def check_compatible(self, *, vocab_size: int | None = None, temperature: float | None = None) -> None:
        """ValueError unless the cache fits a student of ``vocab_size`` trained at ``temperature``."""
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ValueError(f"{self.path}: the teacher's vocabulary ({self.vocab_size}) is larger than the student's "
                             f"({vocab_size}); its top-k indices may fall outside the student's vocabulary")
        if temperature is not None and not math.isclose(temperature, self.temperature):
            raise ValueError(f"{self.path}: cached at temperature {self.temperature}, asked for {temperature}; "
                             "top-k log-probs depend on τ, so re-cache at the training temperature")

    def _read_shard(self, shard: dict) -> dict:
        file = os.path.join(self.path, shard["file"])
        with safe_open(file, framework="pt") as handle:
            header = handle.metadata() or {}
            for field in ("format", "k", "temperature", "teacher", "teacher_vocab_size"):
                if header.get(field) != str(self.index[field]):
                    raise ValueError(f"{file}: metadata field {field!r} is {header.get(field)!r}, "
                                     f"the index says {self.index[field]!r}")
            missing = [name for name in TENSORS if name not in handle.keys()]
            if missing:
                raise ValueError(f"{file}: missing tensor(s) {missing}")
            tensors = {name: handle.get_tensor(name) for name in TENSORS}
        tokens = tensors["token_ids"].shape[0]
        offsets = tensors["sequence_offsets"]
        for name in ("topk_logprobs", "topk_indices"):
            if tuple(tensors[name].shape) != (tokens, self.k):
                raise ValueError(f"{file}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected ({tokens}, {self.k})")
        if (offsets.dim() != 1 or offsets.numel() != int(shard["num_sequences"]) + 1 or int(offsets[0]) != 0
                or int(offsets[-1]) != tokens or bool((offsets.diff() <= 0).any())):
            raise ValueError(f"{file}: tensor 'sequence_offsets' does not split {tokens} tokens into "
                             f"{shard['num_sequences']} non-empty sequences")
        indices = tensors["topk_indices"]
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.vocab_size):
            raise ValueError(f"{file}: tensor 'topk_indices' holds ids in [{int(indices.min())}, {int(indices.max())}], "
                             f"outside the teacher's vocabulary of {self.vocab_size}")
        return tensors

    def __iter__(self) -> Iterator[dict]:
        for shard in self.index["shards"]:
            tensors = self._read_shard(shard)
            offsets = tensors["sequence_offsets"].tolist()
            for start, stop in zip(offsets[:-1], offsets[1:]):
                yield {
                    "input_ids": tensors["token_ids"][start:stop].long(),
                    "topk_logprobs": tensors["topk_logprobs"][start:stop],
                    "topk_indices": tensors["topk_indices"][start:stop].long(),
                }


def load_teacher_topk(path: str | os.PathLike) -> TeacherTopKCache:
    """Opens a cache written by ``cache_teacher_topk`` (see ``TeacherTopKCache``)."""
    return TeacherTopKCache(path)
