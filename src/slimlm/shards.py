"""Token shards: a corpus tokenised once into memory-mapped files, read in constant memory.

Writing (``write_shards``): documents stream from the sources (``slimlm.data.read_source``:
text, JSONL, Parquet, saved datasets; ``hub:NAME[:CONFIG]`` streams a hub dataset when
``datasets`` is installed), are tokenised in batches of ``batch_chars`` characters by
``num_proc`` worker processes (in order, at most two batches per worker in flight) and
appended to the shard being written. Memory is bounded by the batches in flight and the
largest document, whatever the corpus size.

Conventions: no special tokens but EOS after every document (``add_eos``; as
``slimlm.data.tokenize_blocks``), so the stream equals what ``tokenize_blocks(pack=True)``
packs; ``add_bos`` also starts every document with BOS (off by default: SmolLM2 and the GPT-2
family separate documents with EOS only). Documents that are empty, whitespace only or
tokenise to nothing are left out.

The folder::

    manifest.json        format, version, dtype, tokenizer identity, settings, sources, shards
    tokens-00000.bin     token ids, uint16 when every id < 65536 else uint32, little-endian
    docs-00000.bin       int64 (little-endian) offsets: document j of the shard is tokens[docs[j]:docs[j+1]]
    ...                  (num_documents + 1 offsets, the first 0, the last num_tokens)

A shard ends at the first document boundary at or past ``shard_tokens`` tokens (documents never
straddle shards). The output is written into a staging sibling and swapped in when complete
(``slimlm.outputs``); the staging manifest records each finished shard with its digests and
where in the sources the next one starts, so a rerun after an interruption keeps the finished
shards that still match and redoes only the partial one.

Reading (``TokenShards``): the manifest and every file's size are checked on opening; token
files are memory-mapped lazily (file-backed pages, no anonymous memory proportional to the
corpus). Blocks are cut from the concatenated stream: block i of ``seq_len`` is tokens
[i·seq_len, (i+1)·seq_len), crossing document and shard boundaries alike (packing), so the
shard size never changes the blocks. The tail shorter than a block is dropped unless
``pad_last``. ``sample_blocks`` and ``BlockSampler`` draw blocks through a seeded Feistel
permutation of [0, num_blocks) evaluated per position, so no permutation of the corpus is held.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from slimlm import outputs
from slimlm.data import TokenBlocks, padding_id, read_source, source_paths
from slimlm.errors import InputError
from slimlm.options import Options, option

FORMAT, VERSION = "slimlm-token-shards", 1
MANIFEST = "manifest.json"
HUB_PREFIXES = ("hub:", "hf://")
_OFFSET = np.dtype("<i8")  # document offsets
# Settings that change the token stream, and those that also change the files' layout.
STREAM_SETTINGS = ("text_field", "split", "add_bos", "add_eos", "max_tokens")
LAYOUT_SETTINGS = STREAM_SETTINGS + ("shard_tokens",)


@dataclass
class TokenizeOptions(Options):
    """How a corpus is tokenised into shards: ``slimlm tokenize``'s flags, a recipe's
    ``tokenize:`` section and ``write_shards``' options in Python."""

    SECTION = "tokenize"

    text_field: str = option("text", "field of JSONL/Parquet records and dataset rows holding the text")
    split: str | None = option(None, "split of a saved DatasetDict, or of a hub dataset (default there: train)")
    shard_tokens: int = option(100_000_000, "tokens per shard file (a shard ends at the first document boundary "
                                            "past it)", check="positive")
    num_proc: int = option(1, "tokenizer worker processes (1: tokenise in this process)", check="positive")
    batch_chars: int = option(1_000_000, "characters of text per tokenizer batch (bounds each worker's memory)",
                              check="positive")
    add_bos: bool = option(False, "start every document with the tokenizer's BOS token")
    add_eos: bool = option(True, "end every document with the tokenizer's EOS token")
    max_tokens: int | None = option(None, "stop at the first document boundary past this many tokens (default: "
                                          "every document)", check="positive")


# ------------------------------------------------------------------ format
def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (``vocab_size`` ≤ 65536), else uint32, little-endian; InputError above 2**32."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise InputError(f"a vocabulary of {vocab_size} tokens does not fit token shards (ids are at most uint32, "
                     f"{1 << 32} tokens)")


def vocab_bound(tokenizer) -> int:
    """One more than the largest id the tokenizer can give (its length, or its largest vocabulary id + 1)."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)


def tokenizer_identity(tokenizer) -> dict:
    """Who made a set of shards: the tokenizer's ``name_or_path``, vocabulary size, special ids and
    a digest of its whole definition (a fast tokenizer's JSON without its truncation and padding
    state, else its vocabulary), so the same tokenizer loaded from elsewhere matches."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""), "vocab_size": vocab_bound(tokenizer),
            "digest": digest, "eos_id": tokenizer.eos_token_id, "bos_id": tokenizer.bos_token_id,
            "pad_id": padding_id(tokenizer)}


def _tokenizer_difference(recorded: dict, current: dict) -> str | None:
    if all(recorded.get(key) == current[key] for key in ("digest", "vocab_size", "eos_id", "bos_id")):
        return None
    return (f"made by another tokenizer ({recorded.get('name_or_path')!r}: {recorded.get('vocab_size')} tokens, "
            f"digest {recorded.get('digest')}, eos {recorded.get('eos_id')}, bos {recorded.get('bos_id')}), not "
            f"{current['name_or_path']!r} ({current['vocab_size']} tokens, digest {current['digest']}, eos "
            f"{current['eos_id']}, bos {current['bos_id']})")


def _hub_name(spec) -> str | None:
    spec = os.fspath(spec)
    for prefix in HUB_PREFIXES:
        if spec.startswith(prefix):
            return spec[len(prefix):].removeprefix("datasets/")
    return None


def _specs(sources) -> list[str]:
    specs = [os.fspath(sources)] if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]
    if not specs:
        raise InputError("no data sources given")
    return specs


def local_sources(sources) -> list[str]:
    """The sources that are local paths or globs (not hub ids), for the output checks."""
    return [spec for spec in _specs(sources) if _hub_name(spec) is None]


def _size_and_mtime(path: str) -> tuple[int, float]:
    if os.path.isfile(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime
    stats = [os.stat(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names]
    return sum(s.st_size for s in stats), max((s.st_mtime for s in stats), default=0.0)


def source_records(sources, split: str | None = None, *, known: Iterable[dict] = ()) -> list[dict]:
    """One record per source in reading order: a local file or saved dataset as its absolute
    path, size, mtime and SHA-256 (``outputs.file_digest``), a hub dataset as its name, config
    and split. A digest of ``known`` is reused for a path whose size and mtime are unchanged."""
    previous = {record.get("path"): record for record in known}
    records = []
    for spec in _specs(sources):
        name = _hub_name(spec)
        if name is not None:
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise InputError(f"data {spec}: streaming a hub dataset needs the `datasets` package, which is not "
                                 "installed (pip install datasets), or save the data locally") from None
            name, _, config = name.partition(":")
            records.append({"hub": name, "config": config or None, "split": split or "train"})
            continue
        for path in source_paths(spec):
            path = os.path.abspath(path)
            size, mtime = _size_and_mtime(path)
            old = previous.get(path)
            same = old is not None and old.get("size") == size and old.get("mtime") == mtime
            records.append({"path": path, "size": size, "mtime": mtime,
                            "sha256": old["sha256"] if same else outputs.file_digest(path)})
    return records


def _sources_difference(recorded: list[dict], current: list[dict]) -> str | None:
    def key(record):
        return record.get("path") or f"hub:{record.get('hub')}"

    if [key(r) for r in recorded] != [key(r) for r in current]:
        return (f"made from other sources ({', '.join(map(key, recorded))}), not "
                f"{', '.join(map(key, current))}")
    for old, new in zip(recorded, current):
        if "hub" in new:
            if (old.get("config"), old.get("split")) != (new["config"], new["split"]):
                return (f"made from {key(new)} config {old.get('config')!r} split {old.get('split')!r}, not config "
                        f"{new['config']!r} split {new['split']!r}")
        elif old.get("size") != new["size"]:
            return f"source {new['path']} changed since the shards were written ({old.get('size')} → {new['size']} bytes)"
        elif old.get("sha256") != new["sha256"]:
            return f"source {new['path']} changed since the shards were written (its SHA-256 differs)"
    return None


def _settings_difference(recorded: dict, current: dict, names) -> str | None:
    changed = [name for name in names if recorded.get(name) != current.get(name)]
    if not changed:
        return None
    return "made with " + ", ".join(f"{name}={recorded.get(name)!r}, not {current.get(name)!r}" for name in changed)


def _identity_difference(recorded: dict, current: dict, settings=LAYOUT_SETTINGS) -> str | None:
    """Why shards recorded as ``recorded`` are not those ``current`` describes (None: they are)."""
    if (recorded.get("format"), recorded.get("version")) != (FORMAT, VERSION):
        return f"written in another format ({recorded.get('format')} version {recorded.get('version')})"
    return (_tokenizer_difference(recorded.get("tokenizer") or {}, current["tokenizer"])
            or _settings_difference(recorded.get("settings") or {}, current["settings"], settings)
            or _sources_difference(recorded.get("sources") or [], current["sources"]))


def _identity(tokenizer, sources, options: TokenizeOptions, known=()) -> dict:
    for flag, token_id, token in ((options.add_eos, tokenizer.eos_token_id, "EOS"),
                                  (options.add_bos, tokenizer.bos_token_id, "BOS")):
        if flag and token_id is None:
            raise InputError(f"add_{token.lower()} is on but the tokenizer has no {token} token")
    identity = tokenizer_identity(tokenizer)
    return {"format": FORMAT, "version": VERSION, "dtype": token_dtype(identity["vocab_size"]).name,
            "tokenizer": identity, "settings": {name: getattr(options, name) for name in LAYOUT_SETTINGS},
            "sources": source_records(sources, options.split, known=known)}


# ------------------------------------------------------------------ writing
def _documents(sources: list[dict], options: TokenizeOptions, start=(0, 0)) -> Iterator[tuple[tuple[int, int], str]]:
    """((source index, document index), text) from ``start`` on; every document counts, blank ones too."""
    for index, source in enumerate(sources):
        if index < start[0]:
            continue
        skip = start[1] if index == start[0] else 0
        texts = _hub_texts(source, options.text_field) if "hub" in source else \
            read_source(source["path"], options.text_field, options.split)
        for number, text in enumerate(texts):
            if number >= skip:
                yield (index, number), text


def _hub_texts(source: dict, text_field: str) -> Iterator[str]:
    import datasets

    name = f"hub:{source['hub']}"
    try:
        rows = datasets.load_dataset(source["hub"], source["config"], split=source["split"], streaming=True)
    except Exception as error:  # unknown dataset, config or split, no network: the hub's own words
        raise InputError(f"data {name}: {' '.join(str(error).split())[:300]}") from None
    for row in rows:
        value = row.get(text_field)
        if value is not None and not isinstance(value, str):
            raise InputError(f"data {name}: field {text_field!r} is {type(value).__name__}, not a string")
        if value is None and text_field not in row:
            raise InputError(f"data {name}: no text field {text_field!r} (has: {', '.join(row)})")
        yield value or ""


def _batches(documents, batch_chars: int):
    """(texts, positions) of consecutive documents, each batch at least ``batch_chars`` characters but the last."""
    texts, positions, chars = [], [], 0
    for position, text in documents:
        texts.append(text)
        positions.append(position)
        chars += len(text)
        if chars >= batch_chars:
            yield texts, positions
            texts, positions, chars = [], [], 0
    if texts:
        yield texts, positions


class _Encoder:
    """A batch of documents → (their tokens concatenated, each document's token count; 0 for one left out)."""

    def __init__(self, tokenizer, *, add_bos: bool, add_eos: bool, dtype: np.dtype, bound: int):
        self.tokenizer, self.dtype, self.bound = tokenizer, dtype, bound
        self.prefix = [tokenizer.bos_token_id] if add_bos else []
        self.suffix = [tokenizer.eos_token_id] if add_eos else []
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        # The fast tokenizer's own batch encoding skips what the transformers wrapper builds around the ids.
        self.encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __getstate__(self):
        return {**self.__dict__, "encode_batch": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        backend = self.tokenizer.backend_tokenizer if getattr(self.tokenizer, "is_fast", False) else None
        self.encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        kept = [index for index, text in enumerate(texts) if text.strip()]
        batch = [texts[index] for index in kept]
        if not batch:
            encoded = []
        elif self.encode_batch is not None:
            encoded = [encoding.ids for encoding in self.encode_batch(batch, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
        extra = len(self.prefix) + len(self.suffix)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for index, ids in zip(kept, encoded):
            lengths[index] = len(ids) + extra if ids else 0
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        start = 0
        for ids in encoded:
            if ids:
                document = self.prefix + ids + self.suffix if extra else ids
                tokens[start : start + len(document)] = document
                start += len(document)
        if tokens.size and int(tokens.max()) >= self.bound:
            raise ValueError(f"the tokenizer gave id {int(tokens.max())}, past its vocabulary of {self.bound}")
        return tokens, lengths


_WORKER: list[_Encoder] = []


def _start_worker(encoder: _Encoder) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles an interrupt and ends the pool
    _WORKER[:] = [encoder]


def _encode_in_worker(texts: list[str]):
    return _WORKER[0](texts)


@contextlib.contextmanager
def _quiet_tokenizers_parallelism():
    """Workers forked from a process whose tokenizer ran threads turn them off (one per core is
    what the pool is for); saying so first keeps tokenizers from warning about it in each."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encoded(batches, encoder: _Encoder, num_proc: int):
    """(tokens, lengths, positions) per batch, in order; with ``num_proc`` > 1 encoded by that many
    worker processes, at most two batches each in flight (reading never runs ahead of them)."""
    if num_proc == 1:
        for texts, positions in batches:
            yield (*encoder(texts), positions)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with _quiet_tokenizers_parallelism():
        pool = context.Pool(num_proc, initializer=_start_worker, initargs=(encoder,))
    try:
        pending = collections.deque()
        for texts, positions in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), positions))
            if len(pending) >= 2 * num_proc:
                result, positions = pending.popleft()
                yield (*result.get(), positions)
        while pending:
            result, positions = pending.popleft()
            yield (*result.get(), positions)
    finally:
        pool.terminate()
        pool.join()


def shard_names(index: int) -> tuple[str, str]:
    """The token and document-offset file names of shard ``index``."""
    return f"tokens-{index:05d}.bin", f"docs-{index:05d}.bin"


class _ShardFile:
    """One shard being written: its two files, appended to and hashed as they grow."""

    def __init__(self, folder: str, index: int):
        self.names = shard_names(index)
        self.handles = [open(os.path.join(folder, name), "wb") for name in self.names]
        self.digests = [hashlib.sha256(), hashlib.sha256()]
        self.num_tokens = self.num_documents = 0
        self._write(1, np.zeros(1, dtype=_OFFSET))

    def _write(self, which: int, values: np.ndarray) -> None:
        raw = values.tobytes()
        self.handles[which].write(raw)
        self.digests[which].update(raw)

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self._write(0, tokens)
        self._write(1, self.num_tokens + np.cumsum(lengths[lengths > 0], dtype=_OFFSET))
        self.num_tokens += tokens.size
        self.num_documents += int(np.count_nonzero(lengths))

    def close(self, next_position) -> dict:
        for handle in self.handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return {"tokens": self.names[0], "docs": self.names[1], "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "tokens_sha256": self.digests[0].hexdigest()[:16],
                "docs_sha256": self.digests[1].hexdigest()[:16], "next": list(next_position)}

    def discard(self) -> None:
        for handle in self.handles:
            handle.close()


class _ShardSet:
    """The shards of one output in its staging folder: cuts the stream into shards at document
    boundaries and records each finished one in the manifest (``complete: false`` until the end)."""

    def __init__(self, staging: str, manifest: dict, options: TokenizeOptions, log):
        self.staging, self.manifest, self.options, self.log = staging, manifest, options, log
        self.current: _ShardFile | None = None
        self.total = sum(shard["num_tokens"] for shard in manifest["shards"])
        self.last_position = tuple(manifest["shards"][-1]["next"]) if manifest["shards"] else (0, 0)
        self.started = time.perf_counter()
        self.written = 0

    @property
    def done(self) -> bool:
        return self.options.max_tokens is not None and self.total >= self.options.max_tokens

    def save(self) -> None:
        outputs.write_json(os.path.join(self.staging, MANIFEST), self.manifest)

    def add(self, tokens: np.ndarray, lengths: np.ndarray, positions: list) -> None:
        """Append a batch; stops short (``done``) at the first document boundary past ``max_tokens``."""
        ends = np.cumsum(lengths)
        first_doc = first_token = 0
        while first_doc < len(lengths) and not self.done:
            if self.current is None:
                self.current = _ShardFile(self.staging, len(self.manifest["shards"]))
            room = self.options.shard_tokens - self.current.num_tokens
            if self.options.max_tokens is not None:
                room = min(room, self.options.max_tokens - self.total)
            last = int(np.searchsorted(ends, first_token + room, side="left"))
            if last >= len(lengths):
                self._append(tokens[first_token:], lengths[first_doc:])
                self.last_position = (positions[-1][0], positions[-1][1] + 1)
                return
            self._append(tokens[first_token : ends[last]], lengths[first_doc : last + 1])
            self.last_position = (positions[last][0], positions[last][1] + 1)
            self._close()
            first_doc, first_token = last + 1, int(ends[last])

    def _append(self, tokens, lengths) -> None:
        self.current.append(tokens, lengths)
        self.total += tokens.size
        self.written += tokens.size

    def _close(self) -> None:
        record = self.current.close(self.last_position)
        self.current = None
        self.manifest["shards"].append(record)
        self.manifest["num_tokens"] = self.total
        self.manifest["num_documents"] = sum(shard["num_documents"] for shard in self.manifest["shards"])
        self.save()
        rate = self.written / max(time.perf_counter() - self.started, 1e-9)
        self.log(f"[tokenize] {record['tokens']}: {record['num_tokens']:,} tokens, {record['num_documents']:,} "
                 f"documents ({self.total:,} in all, {rate / 1e6:.2f}M tokens/s)")

    def finish(self) -> None:
        if self.current is not None and self.current.num_documents:
            self._close()
        elif self.current is not None:
            self.current.discard()
        if self.total == 0:
            raise InputError("no tokens: every document of the sources is empty, whitespace only or tokenised to "
                             "nothing")
        self.manifest["complete"] = True
        self.save()


def _kept_shards(staging: str, identity: dict, log) -> dict | None:
    """The staging manifest of an interrupted run of the same inputs, trimmed to the shards whose
    files still match it, the files of any other removed; None when there is none to continue."""
    manifest = _read_json(os.path.join(staging, MANIFEST))
    if manifest is None or _identity_difference(manifest, identity) is not None:
        return None
    kept = []
    for shard in manifest.get("shards", []):
        files = [os.path.join(staging, shard["tokens"]), os.path.join(staging, shard["docs"])]
        if not all(os.path.isfile(path) for path in files) or \
                [outputs.file_digest(path) for path in files] != [shard["tokens_sha256"], shard["docs_sha256"]]:
            break
        kept.append(shard)
    names = {name for shard in kept for name in (shard["tokens"], shard["docs"])} | {MANIFEST, outputs.MARKER}
    for name in os.listdir(staging):
        if name not in names:
            outputs.remove(os.path.join(staging, name))
    manifest["shards"], manifest["complete"] = kept, False
    log(f"[tokenize] continuing the partial {staging}: {len(kept)} finished shard(s) kept")
    return manifest


def write_shards(sources, tokenizer, out, *, options: TokenizeOptions | None = None, overwrite: bool = False,
                 progress: bool = False, log=print, **fields) -> "TokenShards":
    """Tokenise ``sources`` (paths, globs, saved datasets, ``hub:NAME[:CONFIG]``) with ``tokenizer``
    into the shard folder ``out`` and open it. Options: ``options`` or its fields as keywords
    (``TokenizeOptions``). An existing ``out`` is replaced only with ``overwrite`` (and only a
    slimlm output); one that already holds these very shards is kept as it is. An interrupted run
    is continued from its last finished shard. InputError for no sources, a missing path, a
    blank or unreadable source, an output that is or holds an input, a tokenizer without the
    EOS/BOS asked for or a vocabulary past 2**32, and sources with no token at all."""
    if options is not None and fields:
        raise ValueError("pass either options or its fields, not both")
    options = options if options is not None else TokenizeOptions(**fields)
    sources = _specs(sources)
    out = outputs.resolve(out)
    staging = outputs.staging_path(out)
    out = outputs.check_output(out, overwrite, {"data": local_sources(sources)}, related=[staging])
    previous = _read_json(os.path.join(out, MANIFEST)) or {}
    identity = _identity(tokenizer, sources, options, known=previous.get("sources", ()))
    if previous.get("complete") and _identity_difference(previous, identity) is None and \
            shards_stale_reason(out) is None:
        log(f"[tokenize] {out} already holds these shards")
        return TokenShards(out)
    outputs.recover(out)
    manifest = _kept_shards(staging, identity, log) if os.path.isdir(staging) else None
    if manifest is None:
        outputs.prepare(out)
        manifest = {**identity, "complete": False, "shards": [], "num_tokens": 0, "num_documents": 0}
    shards = _ShardSet(staging, manifest, options, log)
    shards.save()
    encoder = _Encoder(tokenizer, add_bos=options.add_bos, add_eos=options.add_eos,
                       dtype=np.dtype(identity["dtype"]).newbyteorder("<"), bound=identity["tokenizer"]["vocab_size"])
    bar = _progress_bar(progress, shards.total, options.max_tokens)
    try:
        if not shards.done:
            batches = _batches(_documents(identity["sources"], options, shards.last_position), options.batch_chars)
            with contextlib.closing(_encoded(batches, encoder, options.num_proc)) as results:
                for tokens, lengths, positions in results:
                    before = shards.total
                    shards.add(tokens, lengths, positions)
                    bar.update(shards.total - before)
                    if shards.done:
                        break
        shards.finish()
    except BaseException:
        if shards.current is not None:
            shards.current.discard()
        if not manifest["shards"]:  # nothing a rerun could keep
            outputs.remove(staging)
        raise
    finally:
        bar.close()
    outputs.commit(staging, out)
    log(f"[tokenize] {out}: {manifest['num_tokens']:,} tokens, {manifest['num_documents']:,} documents in "
        f"{len(manifest['shards'])} shard(s) ({identity['dtype']})")
    return TokenShards(out)


def _progress_bar(show: bool, initial: int, total: int | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc="tokenize", disable=not show)


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------ reading
class TokenShards:
    """A shard folder written by ``write_shards``, memory-mapped. Opening it checks the manifest
    and every file's size against it (InputError naming the file: nothing is read past a
    truncated shard); ``verify`` checks the digests too."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise InputError(f"token shards {path}: no {MANIFEST} (not a folder written by slimlm tokenize)")
        manifest = _read_json(manifest_path)
        if manifest is None:
            raise InputError(f"token shards {path}: {MANIFEST} is not valid JSON")
        if (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
            raise InputError(f"token shards {path}: {MANIFEST} is format {manifest.get('format')!r} version "
                             f"{manifest.get('version')!r}, not {FORMAT!r} version {VERSION}")
        if not manifest.get("complete"):
            raise InputError(f"token shards {path}: incomplete (the run writing them did not finish)")
        try:
            self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            shards = manifest["shards"]
            counts = [int(shard["num_tokens"]) for shard in shards]
            documents = [int(shard["num_documents"]) for shard in shards]
            names = [(shard["tokens"], shard["docs"]) for shard in shards]
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"token shards {path}: {MANIFEST} is damaged ({type(error).__name__}: {error})") from None
        if self.dtype.kind != "u" or self.dtype.itemsize not in (2, 4) or not shards:
            raise InputError(f"token shards {path}: {MANIFEST} is damaged (dtype {self.dtype}, {len(shards)} shards)")
        for (tokens, docs), count, num_documents in zip(names, counts, documents):
            self._check_size(tokens, count * self.dtype.itemsize, f"{count} tokens")
            self._check_size(docs, (num_documents + 1) * 8, f"{num_documents} documents")
        self.manifest = manifest
        self._files = [os.path.join(self.path, tokens) for tokens, _ in names]
        self._doc_files = [os.path.join(self.path, docs) for _, docs in names]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._doc_starts = np.concatenate([[0], np.cumsum(documents)]).astype(np.int64)
        self._maps: dict[tuple[str, int], np.memmap] = {}

    def _check_size(self, name: str, expected: int, what: str) -> None:
        path = os.path.join(self.path, name)
        if not os.path.isfile(path):
            raise InputError(f"token shards {self.path}: {name} is missing")
        size = os.path.getsize(path)
        if size != expected:
            raise InputError(f"token shards {self.path}: {name} is {size} bytes, not the {expected} of its {what} "
                             "in the manifest (truncated or changed since written); write the shards again")

    def __getstate__(self):  # a DataLoader worker maps the files itself rather than receive copies
        return {**self.__dict__, "_maps": {}}

    def __repr__(self) -> str:
        return f"TokenShards({self.path!r}: {self.num_tokens:,} tokens, {self.num_shards} shards, {self.dtype.name})"

    # ------------------------------------------------------------- sizes
    @property
    def num_tokens(self) -> int:
        return int(self._starts[-1])

    @property
    def num_documents(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._files)

    @property
    def tokenizer(self) -> dict:
        """The identity of the tokenizer that wrote the shards (``tokenizer_identity``)."""
        return self.manifest["tokenizer"]

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer["pad_id"])

    # ------------------------------------------------------------- access
    def _map(self, kind: str, shard: int) -> np.memmap:
        key = (kind, shard)
        if key not in self._maps:
            path, dtype = (self._files[shard], self.dtype) if kind == "tokens" else (self._doc_files[shard], _OFFSET)
            self._maps[key] = np.memmap(path, dtype=dtype, mode="r")
        return self._maps[key]

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream: a view of the mapped file inside one
        shard, a copy across shards."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"tokens [{start}, {stop}) outside [0, {self.num_tokens})")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            end = min(stop, int(self._starts[first + 1]))
            offset = int(self._starts[first])
            pieces.append(self._map("tokens", first)[start - offset : end - offset])
            start, first = end, first + 1
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def document(self, index: int) -> np.ndarray:
        """The tokens of document ``index`` (with its BOS/EOS)."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} outside [0, {self.num_documents})")
        shard = int(np.searchsorted(self._doc_starts, index, side="right")) - 1
        local = index - int(self._doc_starts[shard])
        begin, end = self._map("docs", shard)[local : local + 2]
        return self._map("tokens", shard)[int(begin) : int(end)]

    def verify(self) -> None:
        """Check every file's digest against the manifest (reads them all); InputError naming the file."""
        for shard in self.manifest["shards"]:
            for name, key in ((shard["tokens"], "tokens_sha256"), (shard["docs"], "docs_sha256")):
                if outputs.file_digest(os.path.join(self.path, name)) != shard[key]:
                    raise InputError(f"token shards {self.path}: {name} changed since written (its SHA-256 "
                                     "differs from the manifest's); write the shards again")

    # ------------------------------------------------------------- freshness
    def stale_reason(self, tokenizer=None, sources=None, options: TokenizeOptions | None = None, *,
                     digest: bool = False) -> str | None:
        """Why these shards are not the tokenisation of ``sources`` by ``tokenizer`` with
        ``options`` (each checked only when given), or None. A source's digest is computed only
        when its size or mtime changed, or with ``digest``."""
        if tokenizer is not None:
            reason = _tokenizer_difference(self.tokenizer, tokenizer_identity(tokenizer))
            if reason:
                return reason
        if options is not None:
            reason = _settings_difference(self.manifest.get("settings", {}), options.as_record(), STREAM_SETTINGS)
            if reason:
                return reason
        if sources is not None:
            split = options.split if options is not None else self.manifest.get("settings", {}).get("split")
            current = source_records(sources, split, known=() if digest else self.manifest.get("sources", ()))
            return _sources_difference(self.manifest.get("sources", []), current)
        return None

    def check(self, tokenizer=None, sources=None, options: TokenizeOptions | None = None, *,
              digest: bool = False) -> "TokenShards":
        """``self``, or InputError saying why the shards are stale (``stale_reason``)."""
        reason = self.stale_reason(tokenizer, sources, options, digest=digest)
        if reason:
            raise InputError(f"token shards {self.path} are stale: {reason}; write them again (slimlm tokenize "
                             "--overwrite)")
        return self

    # ------------------------------------------------------------- blocks
    def blocks(self, seq_len: int, *, pad_last: bool = False) -> "ShardBlocks":
        """The stream cut into blocks of ``seq_len`` (a map-style torch Dataset)."""
        return ShardBlocks(self, seq_len, pad_last=pad_last)

    def sample_blocks(self, num_samples: int, seq_len: int, seed: int = 0, *, pad_last: bool = False) -> TokenBlocks:
        """``num_samples`` distinct blocks drawn with ``seed`` (all of them, shuffled, if more are
        asked): the first ``num_samples`` of ``BlockSampler(seed=seed)``'s first epoch. Only those
        blocks are read."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        blocks = self.blocks(seq_len, pad_last=pad_last)
        count = min(num_samples, len(blocks))
        return blocks.select(Permutation(len(blocks), seed)(np.arange(count)))

    def stream(self, seq_len: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
               drop_last: bool = False, pad_last: bool = False) -> "BlockStream":
        """An IterableDataset of training items over the blocks in ``BlockSampler`` order."""
        blocks = self.blocks(seq_len, pad_last=pad_last)
        return BlockStream(blocks, BlockSampler(len(blocks), seed=seed, shuffle=shuffle, rank=rank,
                                                world_size=world_size, drop_last=drop_last))


def shards_stale_reason(path, tokenizer=None, sources=None, options: TokenizeOptions | None = None) -> str | None:
    """None when ``path`` holds complete, intact shards of ``sources`` by ``tokenizer`` with
    ``options`` (each checked when given); else why not ("missing", "incomplete", a damaged file…)."""
    if not os.path.isfile(os.path.join(os.fspath(path), MANIFEST)):
        return "missing"
    try:
        shards = TokenShards(path)
    except InputError as error:
        return str(error).split(": ", 1)[-1]
    return shards.stale_reason(tokenizer, sources, options)


class ShardBlocks(torch.utils.data.Dataset):
    """Blocks of ``seq_len`` tokens of the shards' stream: block i is tokens [i·seq_len,
    (i+1)·seq_len); the tail shorter than a block is dropped, or with ``pad_last`` padded (pad
    id, attention mask 0, labels -100). An item is ``{"input_ids", "attention_mask", "labels"}``
    LongTensors of shape (seq_len,), as ``slimlm.distill.training.training_items`` makes them."""

    def __init__(self, shards: TokenShards, seq_len: int, *, pad_last: bool = False):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.shards, self.seq_len, self.pad_last = shards, seq_len, pad_last
        self.num_blocks = -(-shards.num_tokens // seq_len) if pad_last else shards.num_tokens // seq_len
        if self.num_blocks == 0:
            raise InputError(f"token shards {shards.path} hold {shards.num_tokens} tokens, fewer than one block of "
                             f"{seq_len}")

    def __len__(self) -> int:
        return self.num_blocks

    def ids(self, index: int) -> np.ndarray:
        """The tokens of block ``index`` (shorter than ``seq_len`` only for a padded last block)."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} outside [0, {self.num_blocks})")
        start = index * self.seq_len
        return self.shards.tokens(start, min(start + self.seq_len, self.shards.num_tokens))

    def _fill(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of the blocks at ``indices``, each (len(indices), seq_len),
        the tokens copied once from the mapped files into the result."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        input_ids = torch.empty((len(indices), self.seq_len), dtype=torch.long)
        mask = torch.ones((len(indices), self.seq_len), dtype=torch.long)
        rows = input_ids.numpy()
        for row, index in enumerate(indices.tolist()):
            tokens = self.ids(index)
            rows[row, : tokens.size] = tokens
            if tokens.size < self.seq_len:
                rows[row, tokens.size :] = self.shards.pad_id
                mask[row, tokens.size :] = 0
        return input_ids, mask

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.ids(int(index))
        if tokens.size == self.seq_len:  # every block but a padded last one: no padding to mask
            input_ids = torch.from_numpy(tokens.astype(np.int64))
            return {"input_ids": input_ids, "attention_mask": torch.ones(self.seq_len, dtype=torch.long),
                    "labels": input_ids.clone()}
        input_ids, mask = (row[0] for row in self._fill([int(index)]))
        return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}

    def select(self, indices) -> TokenBlocks:
        """The blocks at ``indices``, in that order, as ``slimlm.data.TokenBlocks``."""
        return TokenBlocks(*self._fill(indices))


# ------------------------------------------------------------------ order
_ROUNDS = 6
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words."""
    values = (values ^ (values >> np.uint64(30))) * _MIX[0]
    values = (values ^ (values >> np.uint64(27))) * _MIX[1]
    return values ^ (values >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), evaluated per position in O(1) memory: a 6-round balanced
    Feistel network on the smallest even bit width 2h with 4**h ≥ n (keys from ``seed`` and
    ``epoch``), cycle-walked back into [0, n) (fewer than 4 steps on average)."""

    def __init__(self, n: int, seed: int = 0, epoch: int = 0):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2) if n > 1 else 1
        self.mask = np.uint64((1 << self.half) - 1)
        entropy = [seed % (1 << 64), epoch % (1 << 64)]
        self.keys = np.random.SeedSequence(entropy).generate_state(_ROUNDS, dtype=np.uint64)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = values >> half, values & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        """π(positions) as int64; each position must lie in [0, n)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        values = self._encrypt(positions.astype(np.uint64))
        outside = np.flatnonzero(values >= np.uint64(self.n))
        while outside.size:
            values[outside] = self._encrypt(values[outside])
            outside = outside[values[outside] >= np.uint64(self.n)]
        return values.astype(np.int64)


class BlockSampler(torch.utils.data.Sampler):
    """Block indices of [0, num_blocks) for one rank of ``world_size``, epoch after epoch. Epoch e
    visits the blocks in the order π_e(0), π_e(1), … (``Permutation(num_blocks, seed, e)``; the
    identity without ``shuffle``); rank r takes positions r, r + world_size, r + 2·world_size, …
    so the ranks' blocks are disjoint and together every block once per epoch (ranks differ by
    at most one block; ``drop_last`` cuts every rank to num_blocks // world_size, leaving out
    the last num_blocks mod world_size positions of the epoch). Memory is O(1) in num_blocks.

    Iterating yields the rest of the current epoch and moves to the next; ``state_dict`` after k
    indices have been taken, loaded into a new sampler, continues at index k + 1 (a DataLoader
    with workers takes indices ahead of the batches it has delivered: save ``epoch`` and the
    count of samples consumed instead)."""

    _CHUNK = 8192

    def __init__(self, num_blocks: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if drop_last and num_blocks < world_size:
            raise ValueError(f"drop_last with {num_blocks} blocks for {world_size} ranks leaves every rank none")
        self.num_blocks, self.seed, self.shuffle = num_blocks, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = self.index = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_blocks // self.world_size
        return -(-(self.num_blocks - self.rank) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (as torch's DistributedSampler)."""
        self.epoch, self.index = epoch, 0

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """This rank's block indices at its positions [start, stop) of ``epoch``."""
        positions = self.rank + self.world_size * np.arange(start, min(stop, len(self)), dtype=np.int64)
        return Permutation(self.num_blocks, self.seed, epoch)(positions) if self.shuffle else positions

    def __iter__(self) -> Iterator[int]:
        if self.index >= len(self):
            self.set_epoch(self.epoch + 1)
        while self.index < len(self):
            for value in self.indices(self.epoch, self.index, self.index + self._CHUNK).tolist():
                self.index += 1
                yield value
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank,
                "world_size": self.world_size, "drop_last": self.drop_last, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the sampler that saved ``state`` stopped; ValueError for the state of
        another sampler (other blocks, seed, order or ranks)."""
        for key in ("num_blocks", "seed", "shuffle", "rank", "world_size", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state of {key}={state.get(key)!r} cannot continue a sampler of "
                                 f"{key}={getattr(self, key)!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class BlockStream(torch.utils.data.IterableDataset):
    """Training items of ``blocks`` in ``sampler`` order, for a DataLoader or the HF Trainer. In a
    DataLoader with workers, worker w of W yields the items w, w + W, … of the order.

    Under the HF Trainer (accelerate) on several processes, the Trainer itself splits an
    iterable dataset's batches among ranks: give it the stream of rank 0 of 1."""

    def __init__(self, blocks: ShardBlocks, sampler: BlockSampler):
        if sampler.num_blocks != len(blocks):
            raise ValueError(f"the sampler draws from {sampler.num_blocks} blocks, the shards have {len(blocks)}")
        self.blocks, self.sampler = blocks, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        for count, index in enumerate(self.sampler):
            if worker is None or count % worker.num_workers == worker.id:
                yield self.blocks[index]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
