"""What token shards are made with and how their folder is laid out: ``TokenizeOptions``, the
settings a manifest records (``STREAM_SETTINGS``, ``LAYOUT_SETTINGS``), the format's name and
version, the token dtype a vocabulary needs and the shard files' names."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from slimlm.errors import InputError
from slimlm.options import Options, option

FORMAT, VERSION = "slimlm-token-shards", 1
MANIFEST = "manifest.json"
_OFFSET = np.dtype("<i8")  # document offsets
# Settings that change the token stream, and those that also change the files' layout.
STREAM_SETTINGS = ("text_field", "split", "add_bos", "add_eos", "max_tokens", "documents", "heldout_fraction", "seed")
DOCUMENT_SETS = ("all", "train", "heldout")
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
    documents: str = option("all", "which documents: all, or the train or heldout side of a seeded split by "
                                   "document (each document on one side only, whatever the shard layout)",
                            choices=DOCUMENT_SETS)
    heldout_fraction: float = option(0.1, "share of the documents on the heldout side of the split",
                                     check="open_fraction")
    seed: int = option(0, "seed of the split by document")


def held_out(seed: int, source: int, number: int, fraction: float) -> bool:
    """Whether document ``number`` of source ``source`` is on the held-out side of the split of
    ``seed`` (a hash of the three, so each document's side is fixed and needs no memory)."""
    key = hashlib.sha256(f"{seed}:{source}:{number}".encode()).digest()
    return int.from_bytes(key[:8], "little") < fraction * 2.0 ** 64


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


def shard_names(index: int) -> tuple[str, str]:
    """The token and document-offset file names of shard ``index``."""
    return f"tokens-{index:05d}.bin", f"docs-{index:05d}.bin"
