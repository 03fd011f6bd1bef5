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

The modules: ``options`` (``TokenizeOptions``, the recorded settings, the folder's format:
token dtype and file names), ``identity`` (the tokenizer and sources a set of shards was made
from, and why a recorded identity differs from the current one), ``encode`` (documents →
batches → token ids, in worker processes), ``writer`` (``write_shards``: shards cut at document
boundaries, the staging manifest, resuming), ``reader`` (``TokenShards``, ``ShardBlocks``,
``shards_stale_reason``), ``order`` (the Feistel ``Permutation``, ``BlockSampler``,
``BlockStream``).
"""
from slimlm.shards.identity import HUB_PREFIXES, local_sources, source_records, tokenizer_identity
from slimlm.shards.options import (
    FORMAT,
    LAYOUT_SETTINGS,
    MANIFEST,
    STREAM_SETTINGS,
    VERSION,
    TokenizeOptions,
    shard_names,
    token_dtype,
    vocab_bound,
)
from slimlm.shards.order import BlockSampler, BlockStream, Permutation
from slimlm.shards.reader import ShardBlocks, TokenShards, shards_stale_reason, token_blocks
from slimlm.shards.writer import write_shards

# Not public: the tests patch these classes as slimlm.shards._Encoder and slimlm.shards._ShardSet.
from slimlm.shards.encode import _Encoder  # noqa: F401
from slimlm.shards.writer import _ShardSet  # noqa: F401

__all__ = [
    "FORMAT",
    "HUB_PREFIXES",
    "LAYOUT_SETTINGS",
    "MANIFEST",
    "STREAM_SETTINGS",
    "VERSION",
    "BlockSampler",
    "BlockStream",
    "Permutation",
    "ShardBlocks",
    "TokenShards",
    "TokenizeOptions",
    "local_sources",
    "shard_names",
    "shards_stale_reason",
    "token_blocks",
    "source_records",
    "token_dtype",
    "tokenizer_identity",
    "vocab_bound",
    "write_shards",
]
