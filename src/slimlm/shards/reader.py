"""Reading token shards: ``TokenShards`` (the folder checked and memory-mapped, its freshness
against a tokenizer, sources and options), ``shards_stale_reason`` and ``ShardBlocks`` (the
stream cut into training blocks)."""
from __future__ import annotations

import os

import numpy as np
import torch

from slimlm import outputs
from slimlm.outputs import read_json
from slimlm.data import TokenBlocks
from slimlm.errors import InputError
from slimlm.shards.identity import (
    _settings_difference,
    _sources_difference,
    _tokenizer_difference,
    source_names,
    source_records,
    tokenizer_identity,
)
from slimlm.shards.options import _OFFSET, FORMAT, MANIFEST, STREAM_SETTINGS, VERSION, TokenizeOptions
from slimlm.shards.order import BlockSampler, BlockStream, Permutation


class TokenShards:
    """A shard folder written by ``write_shards``, memory-mapped. Opening it checks the manifest
    and every file's size against it (InputError naming the file: nothing is read past a
    truncated shard); ``verify`` checks the digests too."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        manifest_path = os.path.join(self.path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise InputError(f"token shards {path}: no {MANIFEST} (not a folder written by slimlm tokenize)")
        manifest = read_json(manifest_path)
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

    def source_ranges(self) -> list[tuple[int, int, int]]:
        """(source index, start, stop) for each run of the stream read from one data source
        (``manifest["sources"][index]``), in stream order; InputError for shards written before
        slimlm recorded that (write them again)."""
        ranges: list[list[int]] = []
        start = 0
        for shard in self.manifest["shards"]:
            runs = shard.get("sources")
            if not isinstance(runs, list):
                raise InputError(f"token shards {self.path} do not record which data source each token came from "
                                 "(written by an older slimlm): write them again (slimlm tokenize --overwrite)")
            for source, count in runs:
                if ranges and ranges[-1][0] == source and ranges[-1][2] == start:
                    ranges[-1][2] += count
                else:
                    ranges.append([int(source), start, start + int(count)])
                start += int(count)
        if start != self.num_tokens:
            raise InputError(f"token shards {self.path}: {MANIFEST} is damaged (its sources hold {start} tokens, "
                             f"the shards {self.num_tokens})")
        return [tuple(item) for item in ranges]

    def source_names(self) -> list[str]:
        """The name of each data source of ``manifest["sources"]`` (``slimlm.shards.identity.source_name``:
        a file's name without its extensions); InputError when two share one."""
        return source_names(self.manifest.get("sources", []), f"token shards {self.path}")

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


def token_blocks(data, tokenizer, seq_len: int, *, model=None):
    """``data`` cut into blocks of ``seq_len`` tokens, the last one padded: token shards as a lazy
    ``ShardBlocks`` that reads only the blocks used, a list of texts as their ``TokenBlocks``
    (tokenised with ``tokenizer``, in memory). Both have ``len`` and ``select``. InputError when
    ``seq_len`` is above ``model``'s limit."""
    from slimlm.data import check_seq_len, tokenize_blocks

    if not isinstance(data, TokenShards):
        return tokenize_blocks(data, tokenizer, seq_len, model=model)
    check_seq_len(seq_len, model)
    return data.blocks(seq_len, pad_last=True)


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
    LongTensors of shape (seq_len,), as ``slimlm.distill.items.training_items`` makes them."""

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
