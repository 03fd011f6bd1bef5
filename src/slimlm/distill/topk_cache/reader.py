"""Reading a finished cache: ``TeacherTopKCache`` (records memory-mapped, decoded on demand) and
``load_teacher_topk``."""
from __future__ import annotations

import math
import os
from typing import Iterator, Sequence

import numpy as np
import torch

from slimlm.distill.topk_cache.format import (
    FORMAT,
    FORMAT_1_INDEX,
    MANIFEST,
    _check_part_files,
    _read_json,
    teacher_identity,
    tokenizer_identity,
)
from slimlm.distill.topk_codec import TopKCodec
from slimlm.errors import InputError


class TeacherTopKCache:
    """Reads a cache written by ``cache_teacher_topk`` or ``TopKCacheWriter``: records memory-mapped, decoded on demand.

    - iterating yields, per sequence, ``{"input_ids": (T,) int64, "topk_logprobs": (T, k) fp32,
      "topk_indices": (T, k) int64}``, the form the trainer and ``topk_kl_div_loss`` take;
    - ``read(start, stop)``: the decoded (logprobs, ids) of the global token range [start, stop);
    - ``blocks(starts, length)``: (B, length, k) logprobs and ids of the blocks starting at ``starts``;
    - ``tokens(start, stop)``, ``sequence(i)``, ``verify()`` (digests), ``check_compatible(...)``.

    Opening checks the manifest and every file's size (a missing or truncated file is an
    InputError naming it); a record or offsets file that does not decode is an InputError naming
    the file when it is read.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.exists(manifest_path):
            if os.path.exists(os.path.join(self.path, FORMAT_1_INDEX)):
                raise InputError(f"{self.path} holds a teacher cache of format slimlm.teacher_topk/1 (safetensors "
                                 f"shards), which this version no longer reads: re-cache it with cache_teacher_topk")
            raise InputError(f"{manifest_path} not found: {self.path} is not a teacher top-k cache")
        self.manifest = manifest = _read_json(manifest_path)
        if manifest.get("format") != FORMAT:
            raise InputError(f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
        for field in ("k", "vocab_size", "temperature", "codec", "record_bytes", "token_dtype", "teacher", "files"):
            if field not in manifest:
                raise InputError(f"{manifest_path}: missing field {field!r}")
        if not manifest.get("complete"):
            raise InputError(f"{self.path} is an unfinished teacher cache: rerun its writer (cache_teacher_topk, "
                             "served_teacher_topk) with the same arguments to finish it")
        try:
            self.codec = TopKCodec.from_params(manifest["codec"])
        except (ValueError, TypeError) as error:
            raise InputError(f"{manifest_path}: field 'codec': {error}") from None
        if (self.codec.k, self.codec.vocab_size, self.codec.record_bytes) != (
                manifest["k"], manifest["vocab_size"], manifest["record_bytes"]):
            raise InputError(f"{manifest_path}: fields 'k', 'vocab_size', 'record_bytes' disagree with field 'codec'")
        self.k, self.vocab_size, self.record_bytes = self.codec.k, self.codec.vocab_size, self.codec.record_bytes
        self.temperature = float(manifest["temperature"])
        self.identity = manifest["teacher"]
        self.teacher = self.identity.get("teacher")
        self.files = manifest["files"]
        for entry in self.files:
            _check_part_files(self.path, entry, manifest, digests=False)
        self._token_dtype = np.dtype(manifest["token_dtype"]).newbyteorder("<")
        self._token_starts = np.cumsum([0] + [entry["num_tokens"] for entry in self.files])
        self._sequence_starts = np.cumsum([0] + [entry["num_sequences"] for entry in self.files])
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def num_sequences(self) -> int:
        return int(self._sequence_starts[-1])

    @property
    def num_tokens(self) -> int:
        return int(self._token_starts[-1])

    def __len__(self) -> int:
        return self.num_sequences

    def check_compatible(self, *, vocab_size: int | None = None, temperature: float | None = None, k: int | None = None,
                         teacher=None, tokenizer=None, shards: str | None = None) -> None:
        """ValueError unless the cache fits a student of ``vocab_size`` trained at ``temperature``
        with top-``k``, from ``teacher`` (a model or its ``teacher_identity``), ``tokenizer`` (or
        its ``tokenizer_identity``) and the token shards whose manifest digest is ``shards``."""
        if vocab_size is not None and vocab_size < self.vocab_size:
            raise ValueError(f"{self.path}: the teacher's vocabulary ({self.vocab_size}) is larger than the student's "
                             f"({vocab_size}); its top-k indices may fall outside the student's vocabulary")
        if temperature is not None and not math.isclose(temperature, self.temperature):
            raise ValueError(f"{self.path}: cached at temperature {self.temperature}, asked for {temperature}; "
                             "top-k log-probs depend on τ, so re-cache at the training temperature")
        if k is not None and k != self.k:
            raise ValueError(f"{self.path}: cached with k = {self.k}, asked for k = {k}")
        expected = {"teacher": (teacher, teacher_identity), "tokenizer": (tokenizer, tokenizer_identity)}
        for field, (given, identity) in expected.items():
            if given is None:
                continue
            given = given if isinstance(given, dict) else identity(given)
            cached = self.manifest.get(field) or {}
            for key, value in given.items():
                if cached.get(key) != value:
                    raise ValueError(f"{self.path}: cached from another {field} ({key} {cached.get(key)!r}, "
                                     f"asked for {value!r})")
        if shards is not None and self.manifest.get("shards") != shards:
            raise ValueError(f"{self.path}: aligned with the token shards {self.manifest.get('shards')!r}, "
                             f"not with {shards!r}")

    def verify(self) -> None:
        """InputError naming the first file whose bytes differ from the digest the manifest records."""
        for entry in self.files:
            _check_part_files(self.path, entry, self.manifest, digests=True)

    # ------------------------------------------------------------------ raw arrays
    def _array(self, part: int, name: str) -> np.ndarray:
        key = (part, name)
        if key not in self._maps:
            entry = self.files[part]
            file = os.path.join(self.path, entry[name])
            if name == "records":
                array = np.memmap(file, dtype=np.uint8, mode="r", shape=(entry["num_tokens"], self.record_bytes))
            elif name == "tokens":
                array = np.memmap(file, dtype=self._token_dtype, mode="r", shape=(entry["num_tokens"],))
            else:
                array = np.fromfile(file, dtype="<i8")
                if (array.shape != (entry["num_sequences"] + 1,) or array[0] != 0 or array[-1] != entry["num_tokens"]
                        or bool((np.diff(array) <= 0).any())):
                    raise InputError(f"{file}: the offsets do not split {entry['num_tokens']} tokens into "
                                     f"{entry['num_sequences']} non-empty sequences")
            self._maps[key] = array
        return self._maps[key]

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= self.num_tokens:
            raise ValueError(f"token range [{start}, {stop}) is not inside [0, {self.num_tokens}) of {self.path}")

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(part, start, stop) within each part the global token range [start, stop) covers."""
        self._check_range(start, stop)
        first = int(np.searchsorted(self._token_starts, start, side="right")) - 1
        for part in range(max(first, 0), len(self.files)):
            low, high = self._token_starts[part], self._token_starts[part + 1]
            if low >= stop:
                break
            if high > start:
                yield part, int(max(start, low) - low), int(min(stop, high) - low)

    def records(self, start: int, stop: int) -> np.ndarray:
        """(stop − start, R) uint8: the raw records of the global token range [start, stop)."""
        pieces = [self._array(part, "records")[low:high] for part, low, high in self._pieces(start, stop)]
        if not pieces:
            return np.zeros((0, self.record_bytes), dtype=np.uint8)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def tokens(self, start: int, stop: int) -> torch.Tensor:
        """(stop − start,) int64 token ids of the global token range [start, stop)."""
        pieces = [self._array(part, "tokens")[low:high] for part, low, high in self._pieces(start, stop)]
        return torch.from_numpy(np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64))

    def _decode(self, records: np.ndarray, where: str) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            decoded = self.codec.decode(np.ascontiguousarray(records))
        except ValueError as error:
            raise InputError(f"{where}: {error}") from None
        return decoded.logprobs, decoded.ids.long()

    def _where(self, start: int, stop: int) -> str:
        return ", ".join(f"{os.path.join(self.path, self.files[part]['records'])} (tokens {low}:{high})"
                         for part, low, high in self._pieces(start, stop))

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded (logprobs (n, k) fp32 descending, ids (n, k) int64) of global tokens [start, stop)."""
        return self._decode(self.records(start, stop), self._where(start, stop))

    def blocks(self, starts: Sequence[int] | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, length, k) logprobs and ids of the blocks of ``length`` tokens at the global ``starts``."""
        starts = [int(start) for start in torch.as_tensor(starts).reshape(-1)]
        if length < 1 or not starts:
            raise ValueError(f"blocks needs length >= 1 and at least one start, got {length} and {len(starts)} starts")
        logprobs, ids = zip(*(self.read(start, start + length) for start in starts))
        return torch.stack(logprobs), torch.stack(ids)

    def sequence_starts(self, start: int, stop: int) -> np.ndarray:
        """The global token positions in [start, stop) where a sequence begins (int64, ascending)."""
        found = []
        for part, low, high in self._pieces(start, stop):
            offsets = self._array(part, "offsets")[:-1]
            inside = offsets[(offsets >= low) & (offsets < high)]
            found.append(inside.astype(np.int64) + int(self._token_starts[part]))
        return np.concatenate(found) if found else np.zeros(0, np.int64)

    def sequence(self, index: int) -> dict:
        """Sequence ``index``: ``{"input_ids", "topk_logprobs", "topk_indices"}``."""
        if not 0 <= index < self.num_sequences:
            raise IndexError(f"sequence {index} is not in [0, {self.num_sequences}) of {self.path}")
        part = int(np.searchsorted(self._sequence_starts, index, side="right")) - 1
        offsets = self._array(part, "offsets")
        local = index - int(self._sequence_starts[part])
        start = int(self._token_starts[part] + offsets[local])
        stop = int(self._token_starts[part] + offsets[local + 1])
        logprobs, ids = self.read(start, stop)
        return {"input_ids": self.tokens(start, stop), "topk_logprobs": logprobs, "topk_indices": ids}

    def __iter__(self) -> Iterator[dict]:
        for index in range(self.num_sequences):
            yield self.sequence(index)


def load_teacher_topk(path: str | os.PathLike) -> TeacherTopKCache:
    """Opens a cache written by ``cache_teacher_topk`` (see ``TeacherTopKCache``)."""
    return TeacherTopKCache(path)
