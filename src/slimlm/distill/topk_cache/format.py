"""The cache's layout on disk: the format's names, the part files' names and sizes, the
teacher's and tokenizer's identities, and the checks of a listed part's files against the
manifest (shared by the writer's resume and the reader)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from slimlm import outputs
from slimlm.architectures import lm_head
from slimlm.errors import InputError

FORMAT = "slimlm.teacher_topk/2"
MANIFEST = "manifest.json"
FORMAT_1_INDEX = "index.json"  # slimlm.teacher_topk/1: safetensors shards of fp32 + int32
FILES = ("records", "tokens", "offsets")
SUFFIXES = {"records": ".topk", "tokens": ".tokens", "offsets": ".offsets"}
# What a rerun must share with an unfinished cache to continue it.
RUN_FIELDS = ("format", "k", "vocab_size", "temperature", "codec", "record_bytes", "token_dtype", "teacher",
              "tokenizer", "shards", "shard_tokens")


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
