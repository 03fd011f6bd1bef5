"""Offline sparse teacher: a causal LM's top-k log-probabilities per token, on disk, in fixed-size
records (``slimlm.distill.topk_codec``: 142 bytes/token at k = 64, V = 49152, against 512 for fp32
log-probs + int32 ids). ``cache_teacher_topk`` computes them with an in-process model;
``TopKCacheWriter`` writes rows computed elsewhere (a served teacher: ``slimlm.distill.served``)
into the same format, with the same manifest, resume and refusals — the former is built on it.

A cache folder holds ``manifest.json`` and, per part of consecutive sequences, three raw arrays:

- ``part-00000.topk``     uint8 (T, R)   token t's record at byte t·R (memory-mapped on read)
- ``part-00000.tokens``   uint16 or uint32 (T,), little-endian: the sequences' tokens
- ``part-00000.offsets``  int64 (S + 1,), little-endian: sequence s is tokens offsets[s]:offsets[s + 1]

The manifest: format, k, vocab size, temperature, the codec's parameters, record size, the
teacher's identity (``teacher_identity``), the tokenizer's (when given), the identity of the
token shards the parts are aligned with (``shards``, when given), and per part its token and
sequence counts and the SHA-256 digests of its files. Parts close after ``shard_tokens`` tokens
(at a sequence end), or exactly at the given per-part sizes, so that part i can line up with
token shard i.

Row t of a sequence is the teacher's distribution over the token at t + 1 (the logits at
position t, as Hugging Face computes them), so a loss pairs row t with the student's logits at
t. The last row is a real distribution too (over the token after the sequence): a loss over
one sequence ignores it (its label is -100), a block read across a sequence end (``blocks``)
pairs it with the next sequence's first token. Only JSON and raw arrays are read back, never
pickles.

Writing is resumable per part: a part is written under a staging name, renamed once complete,
then listed in the manifest (``"complete": false`` until the last one); a rerun with the same
arguments keeps the listed parts (after checking their sizes, digests and that the dataset
starts with the same sequences) and computes the rest. A listed file that is missing, truncated
or altered is an InputError naming it, and nothing is overwritten.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from slimlm import outputs
from slimlm.architectures import lm_head
from slimlm.distill.topk_codec import TopKCodec
from slimlm.errors import InputError
from slimlm.losses import last_hidden_state
from slimlm.losses.chunked import HeadGemms, pick_chunk_size

FORMAT = "slimlm.teacher_topk/2"
MANIFEST = "manifest.json"
FORMAT_1_INDEX = "index.json"  # slimlm.teacher_topk/1: safetensors shards of fp32 + int32
FILES = ("records", "tokens", "offsets")
SUFFIXES = {"records": ".topk", "tokens": ".tokens", "offsets": ".offsets"}
# What a rerun must share with an unfinished cache to continue it.
RUN_FIELDS = ("format", "k", "vocab_size", "temperature", "codec", "record_bytes", "token_dtype", "teacher",
              "tokenizer", "shards", "shard_tokens")


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


def tokenizer_identity(tokenizer) -> dict:
    """What identifies a tokenizer in a cache: name or path and a digest of its vocabulary."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {"tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            "tokenizer_vocab_digest": hashlib.sha256(vocabulary).hexdigest()[:16]}


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


def _part_names(number: int) -> dict:
    return {name: f"part-{number:05d}{SUFFIXES[name]}" for name in FILES}


def _expected_sizes(entry: dict, manifest: dict) -> dict:
    return {"records": entry["num_tokens"] * manifest["record_bytes"],
            "tokens": entry["num_tokens"] * np.dtype(manifest["token_dtype"]).itemsize,
            "offsets": (entry["num_sequences"] + 1) * 8}


def _check_part_files(folder: str, entry: dict, manifest: dict, *, digests: bool) -> None:
    """InputError naming the first file of a listed part that is missing, of the wrong size or
    (with ``digests``) of other bytes than the manifest records."""
    fields = (*FILES, "num_tokens", "num_sequences", "digests")
    if not isinstance(entry, dict) or any(field not in entry for field in fields):
        raise InputError(f"{os.path.join(folder, MANIFEST)}: a part entry lacks one of the fields {list(fields)}")
    for name, expected in _expected_sizes(entry, manifest).items():
        file = os.path.join(folder, entry[name])
        if not os.path.isfile(file):
            raise InputError(f"{file} is missing: {os.path.join(folder, MANIFEST)} lists it")
        size = os.path.getsize(file)
        if size != expected:
            raise InputError(f"{file} is {'truncated' if size < expected else 'too long'}: {size} bytes where "
                             f"{os.path.join(folder, MANIFEST)} says {expected}")
        if digests and outputs.file_digest(file) != entry["digests"][name]:
            raise InputError(f"{file} does not match the digest {os.path.join(folder, MANIFEST)} records for it")


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{file} cannot be read as JSON: {error}") from None
    if not isinstance(value, dict):
        raise InputError(f"{file} holds {type(value).__name__}, not a JSON object")
    return value


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
