"""Writing a cache: ``TopKCacheWriter`` (rows computed anywhere, one sequence at a time, into
parts written under staging names), resuming an unfinished cache of the same run, and
``refuse_finished_cache``."""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from slimlm import outputs
from slimlm.distill.topk_cache.format import (
    FILES,
    FORMAT,
    FORMAT_1_INDEX,
    MANIFEST,
    RUN_FIELDS,
    _check_part_files,
    _part_names,
    _read_json,
    tokenizer_identity,
)
from slimlm.distill.topk_codec import TopKCodec
from slimlm.errors import InputError


def token_sequences(dataset: Iterable) -> Iterator[torch.Tensor]:
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


def _check_run_arguments(k, vocab, temperature, shard_tokens) -> None:
    if not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the teacher's vocabulary), got {k!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    sizes = [shard_tokens] if isinstance(shard_tokens, int) else list(shard_tokens)
    if not sizes or any(not isinstance(size, int) or size < 1 for size in sizes):
        raise ValueError(f"shard_tokens must be an int >= 1 or a non-empty list of them, got {shard_tokens!r}")


class _PartWriter:
    """Appends sequences to the parts of a cache folder; ``close_part`` puts a finished part
    in place and lists it in the (unfinished) manifest."""

    def __init__(self, folder: str, manifest: dict, codec: TopKCodec):
        self.folder, self.manifest, self.codec = folder, manifest, codec
        self.token_dtype = np.dtype(manifest["token_dtype"])
        self.sizes = manifest["shard_tokens"]
        self.handles: dict | None = None
        self.tokens = 0
        self.lengths: list[int] = []

    def _target(self) -> int:
        number = len(self.manifest["files"])
        if isinstance(self.sizes, int):
            return self.sizes
        if number >= len(self.sizes):
            raise ValueError(f"the dataset holds more tokens than the {len(self.sizes)} token shards of "
                             f"shard_tokens ({sum(self.sizes)} tokens)")
        return self.sizes[number]

    def add(self, ids: torch.Tensor, logprobs: torch.Tensor, indices: torch.Tensor) -> None:
        target = self._target()
        if not isinstance(self.sizes, int) and self.tokens + ids.numel() > target:
            raise ValueError(f"a sequence of {ids.numel()} tokens crosses the end of token shard "
                             f"{len(self.manifest['files'])} ({target} tokens, {self.tokens} filled)")
        if self.handles is None:
            names = _part_names(len(self.manifest["files"]))
            self.handles = {name: open(outputs.staging_path(os.path.join(self.folder, names[name])), "wb")
                            for name in ("records", "tokens")}
        self.handles["records"].write(self.codec.encode(logprobs, indices).numpy().tobytes())
        self.handles["tokens"].write(ids.numpy().astype(self.token_dtype.newbyteorder("<")).tobytes())
        self.tokens += ids.numel()
        self.lengths.append(ids.numel())
        if self.tokens >= target:
            self.close_part()

    def close_part(self) -> None:
        if self.handles is None:
            return
        names = _part_names(len(self.manifest["files"]))
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype("<i8")
        with open(outputs.staging_path(os.path.join(self.folder, names["offsets"])), "wb") as handle:
            handle.write(offsets.tobytes())
        for handle in self.handles.values():
            handle.close()
        self.handles = None
        entry = {**names, "num_tokens": self.tokens, "num_sequences": len(self.lengths), "digests": {}}
        for name in FILES:
            final = os.path.join(self.folder, names[name])
            outputs.commit(outputs.staging_path(final), final)
            entry["digests"][name] = outputs.file_digest(final)
        self.manifest["files"].append(entry)
        self.tokens, self.lengths = 0, []
        self.write_manifest(complete=False)

    def write_manifest(self, complete: bool) -> None:
        files = self.manifest["files"]
        self.manifest.update(complete=complete, num_tokens=sum(entry["num_tokens"] for entry in files),
                             num_sequences=sum(entry["num_sequences"] for entry in files))
        outputs.write_text(os.path.join(self.folder, MANIFEST), json.dumps(self.manifest, indent=1))

    def discard(self) -> None:
        """Deletes the unfinished part's staging files (the listed parts stay)."""
        if self.handles is not None:
            for handle in self.handles.values():
                handle.close()
            self.handles = None
        for name in _part_names(len(self.manifest["files"])).values():
            outputs.remove(outputs.staging_path(os.path.join(self.folder, name)))


def refuse_finished_cache(path: str | os.PathLike) -> None:
    """ValueError when ``path`` already holds a finished cache, which no writer overwrites (a
    caller with an expensive teacher to start asks before starting it)."""
    folder = os.fspath(path)
    if os.path.exists(os.path.join(folder, FORMAT_1_INDEX)):
        raise ValueError(f"{os.path.join(folder, FORMAT_1_INDEX)} exists: {folder} already holds a teacher cache")
    manifest_path = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest_path) and _read_json(manifest_path).get("complete"):
        raise ValueError(f"{manifest_path} exists: {folder} already holds a teacher cache")


def _resume(folder: str, manifest: dict) -> dict:
    """The unfinished manifest in ``folder`` to continue, when its run matches ``manifest``'s;
    ``manifest`` itself when there is none. ValueError for a finished cache, InputError for an
    unfinished one of another run or with a damaged part."""
    refuse_finished_cache(folder)
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.exists(manifest_path):
        return manifest
    found = _read_json(manifest_path)
    for field in RUN_FIELDS:
        if found.get(field) != manifest[field]:
            raise InputError(f"{manifest_path}: an unfinished cache of another run ({field!r} is {found.get(field)!r}, "
                             f"this run's is {manifest[field]!r}); rerun with its arguments to finish it, or write "
                             "to another folder")
    for entry in found.get("files", []):
        _check_part_files(folder, entry, found, digests=True)
    return found


def _kept_sequences(folder: str, manifest: dict) -> Iterator[np.ndarray]:
    """The token ids of the sequences the listed parts hold, in order."""
    for entry in manifest["files"]:
        tokens = np.fromfile(os.path.join(folder, entry["tokens"]), dtype=np.dtype(manifest["token_dtype"]).newbyteorder("<"))
        offsets = np.fromfile(os.path.join(folder, entry["offsets"]), dtype="<i8")
        for start, stop in zip(offsets[:-1], offsets[1:]):
            yield tokens[start:stop]


class TopKCacheWriter:
    """Writes a cache from top-k rows computed elsewhere, one sequence at a time, in the format,
    manifest and layout ``cache_teacher_topk`` writes (which is built on it)::

        with TopKCacheWriter(path, k=64, vocab_size=V, teacher=identity) as writer:
            for ids in sequences:
                if writer.needs(ids):                  # False: a resumed cache already holds it
                    writer.add(ids, logprobs, indices)
            files = writer.finish()

    ``add(ids, logprobs, indices)``: the sequence's token ids (T,) and, per position t, the top-k
    log-probs (T, k) of the teacher's distribution over the token at t + 1 (row T − 1: over the
    token after the sequence) and their distinct vocabulary ids (T, k), in any order. ``teacher``
    is the identity recorded under the manifest's ``teacher`` (``teacher_identity`` for a model;
    a served teacher's is ``slimlm.distill.served``'s); ``tokenizer``, ``shards``, ``shard_tokens``,
    ``temperature``, ``prob_bits`` and ``power`` as in ``cache_teacher_topk``.

    Resume: an unfinished cache of the same run in ``path`` is continued. ``needs(ids)`` is asked
    about every sequence of the dataset in order: False for the ones its listed parts hold (which
    must be the same sequences), True for the ones to compute; ``add`` then takes those, in the
    same order (computed in batches meanwhile, if the caller likes). ``add`` alone, without
    ``needs``, asks it itself and skips a held sequence. A finished cache in ``path`` is refused.
    Leaving the ``with`` block without ``finish`` (an error) deletes the unfinished part's staging
    files and keeps the listed parts.
    """

    def __init__(self, path: str | os.PathLike, *, k: int, vocab_size: int, teacher: dict, temperature: float = 1.0,
                 shard_tokens: int | Sequence[int] = 1 << 20, prob_bits: int = 6, power: float = 0.3,
                 tokenizer=None, shards: str | None = None):
        _check_run_arguments(k, vocab_size, temperature, shard_tokens)
        if not isinstance(teacher, dict) or not teacher:
            raise ValueError(f"teacher must be a non-empty dict identifying the teacher, got {teacher!r}")
        self.codec = TopKCodec(k, vocab_size, prob_bits, power)
        self.folder = os.fspath(path)
        run = {
            "format": FORMAT, "k": k, "vocab_size": vocab_size, "temperature": float(temperature),
            "codec": self.codec.params(), "record_bytes": self.codec.record_bytes,
            "token_dtype": "uint16" if vocab_size <= 1 << 16 else "uint32", "teacher": teacher,
            "tokenizer": tokenizer_identity(tokenizer) if tokenizer is not None else None, "shards": shards,
            "shard_tokens": shard_tokens if isinstance(shard_tokens, int) else list(shard_tokens),
            "complete": False, "files": [],
        }
        os.makedirs(self.folder, exist_ok=True)
        self.manifest = _resume(self.folder, run)
        self._parts = _PartWriter(self.folder, self.manifest, self.codec)
        self._token_limit = int(np.iinfo(self._parts.token_dtype).max) + 1
        self._kept = _kept_sequences(self.folder, self.manifest)
        self._position = 0
        self._pending: list[torch.Tensor] = []
        self._finished = False

    @property
    def k(self) -> int:
        return self.codec.k

    def needs(self, ids) -> bool:
        """Whether the next sequence of the dataset, ``ids``, must be computed and ``add``-ed:
        False when the unfinished cache being continued holds it already. InputError when that
        cache holds another sequence there; ValueError for ids outside the token dtype's range."""
        ids = torch.as_tensor(ids).long().reshape(-1)
        position = self._position
        self._position += 1
        stored = next(self._kept, None)
        if stored is not None:
            if not np.array_equal(stored, ids.numpy()):
                raise InputError(f"dataset item {position} differs from the sequence the unfinished cache in "
                                 f"{self.folder} holds there: continue it with the same dataset, or write to "
                                 "another folder")
            return False
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= self._token_limit:
            found = f"[{int(ids.min())}, {int(ids.max())}]" if ids.numel() else "no ids"
            raise ValueError(f"dataset item {position}: token ids must lie in [0, {self._token_limit}), got {found}")
        self._pending.append(ids)
        return True

    def add(self, ids, logprobs: torch.Tensor, indices: torch.Tensor) -> None:
        """Appends one sequence: ``ids`` (T,), top-k ``logprobs`` (T, k) and their ``indices`` (T, k)."""
        ids = torch.as_tensor(ids).long().reshape(-1)
        if not self._pending and not self.needs(ids):
            return
        expected = self._pending.pop(0)
        if not torch.equal(expected, ids):
            raise ValueError(f"add() got a sequence of {ids.numel()} tokens where needs() asked for the one of "
                             f"{expected.numel()} tokens before it: add the needed sequences in order")
        logprobs, indices = torch.as_tensor(logprobs), torch.as_tensor(indices)
        if logprobs.shape != (ids.numel(), self.k) or indices.shape != logprobs.shape:
            raise ValueError(f"a sequence of {ids.numel()} tokens needs logprobs and indices of shape "
                             f"({ids.numel()}, {self.k}), got {tuple(logprobs.shape)} and {tuple(indices.shape)}")
        self._parts.add(ids, logprobs.float().cpu(), indices.cpu())

    def finish(self) -> list[str]:
        """Closes the last part and marks the cache complete; returns the records files' paths."""
        if self._pending:
            raise ValueError(f"needs() asked for {len(self._pending)} sequence(s) that were never add()-ed")
        if next(self._kept, None) is not None:
            raise InputError(f"the dataset ends before the sequences the unfinished cache in {self.folder} "
                             "already holds")
        self._parts.close_part()
        files, sizes = self.manifest["files"], self.manifest["shard_tokens"]
        if not files:
            raise ValueError("dataset yielded no sequences; nothing was cached")
        if not isinstance(sizes, int) and len(files) != len(sizes):
            raise ValueError(f"the dataset fills {len(files)} of the {len(sizes)} token shards of shard_tokens")
        # The manifest marked complete is what makes the folder a cache: written last, atomically.
        self._parts.write_manifest(complete=True)
        self._finished = True
        return [os.path.join(self.folder, entry["records"]) for entry in files]

    def discard(self) -> None:
        """Deletes the unfinished part's staging files (the listed parts stay)."""
        self._parts.discard()

    def __enter__(self) -> "TopKCacheWriter":
        return self

    def __exit__(self, *exception) -> None:
        if not self._finished:
            self.discard()
