"""``write_shards``: the encoded stream cut into shard files at document boundaries, written
into a staging folder whose manifest records each finished shard, continued after an
interruption and swapped in when complete."""
from __future__ import annotations

import contextlib
import hashlib
import os
import time

import numpy as np

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.shards.encode import _batches, _documents, _encoded, _Encoder
from slimlm.shards.identity import _identity, _identity_difference, _specs, local_sources
from slimlm.shards.options import _OFFSET, MANIFEST, TokenizeOptions, shard_names
from slimlm.outputs import read_json
from slimlm.shards.reader import TokenShards, shards_stale_reason


class _ShardFile:
    """One shard being written: its two files, appended to and hashed as they grow."""

    def __init__(self, folder: str, index: int):
        self.names = shard_names(index)
        self.handles = [open(os.path.join(folder, name), "wb") for name in self.names]
        self.digests = [hashlib.sha256(), hashlib.sha256()]
        self.num_tokens = self.num_documents = 0
        self.sources: list[list[int]] = []  # [source index, tokens] runs, in stream order
        self._write(1, np.zeros(1, dtype=_OFFSET))

    def _write(self, which: int, values: np.ndarray) -> None:
        raw = values.tobytes()
        self.handles[which].write(raw)
        self.digests[which].update(raw)

    def append(self, tokens: np.ndarray, lengths: np.ndarray, sources: np.ndarray) -> None:
        """Append documents of ``lengths`` tokens (0: left out) read from data sources ``sources``."""
        self._write(0, tokens)
        self._write(1, self.num_tokens + np.cumsum(lengths[lengths > 0], dtype=_OFFSET))
        self.num_tokens += tokens.size
        self.num_documents += int(np.count_nonzero(lengths))
        for source in np.unique(sources).tolist():  # sources come in order: one run each per batch
            count = int(lengths[sources == source].sum())
            if not count:
                continue
            if self.sources and self.sources[-1][0] == source:
                self.sources[-1][1] += count
            else:
                self.sources.append([source, count])

    def close(self, next_position) -> dict:
        for handle in self.handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return {"tokens": self.names[0], "docs": self.names[1], "num_tokens": self.num_tokens,
                "num_documents": self.num_documents, "tokens_sha256": self.digests[0].hexdigest()[:16],
                "docs_sha256": self.digests[1].hexdigest()[:16], "next": list(next_position),
                "sources": self.sources}

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
        sources = np.fromiter((position[0] for position in positions), dtype=np.int64, count=len(positions))
        first_doc = first_token = 0
        while first_doc < len(lengths) and not self.done:
            if self.current is None:
                self.current = _ShardFile(self.staging, len(self.manifest["shards"]))
            room = self.options.shard_tokens - self.current.num_tokens
            if self.options.max_tokens is not None:
                room = min(room, self.options.max_tokens - self.total)
            last = int(np.searchsorted(ends, first_token + room, side="left"))
            if last >= len(lengths):
                self._append(tokens[first_token:], lengths[first_doc:], sources[first_doc:])
                self.last_position = (positions[-1][0], positions[-1][1] + 1)
                return
            self._append(tokens[first_token : ends[last]], lengths[first_doc : last + 1], sources[first_doc : last + 1])
            self.last_position = (positions[last][0], positions[last][1] + 1)
            self._close()
            first_doc, first_token = last + 1, int(ends[last])

    def _append(self, tokens, lengths, sources) -> None:
        self.current.append(tokens, lengths, sources)
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
    manifest = read_json(os.path.join(staging, MANIFEST))
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
    previous = read_json(os.path.join(out, MANIFEST)) or {}
    identity = _identity(tokenizer, sources, options, known=previous.get("sources", ()))
    if previous.get("complete") and _identity_difference(previous, identity) is None and \
            shards_stale_reason(out) is None and all("sources" in shard for shard in previous["shards"]):
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
