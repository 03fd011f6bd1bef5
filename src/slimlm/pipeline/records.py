"""What each stage records beside its output, and how a later run reads it back to decide
whether the output is still the one its inputs would make.

A stage's inputs (fingerprints, digests, settings) are compared as they read back from JSON,
so a tuple and the list it is stored as are equal.
"""
from __future__ import annotations

import hashlib
import json
import os

from slimlm.outputs import read_json  # noqa: F401  (re-exported: the stages read their records with it)

DISTILL_RECORD = "slimlm_distill.json"
STAGE_RECORD = "slimlm_stage.json"
RUN_RECORD = "slimlm_run.json"
SYNTHETIC_DONE_SUFFIX = ".done.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def texts_digest(texts) -> str:
    """A short hash of a list of documents (identifies a data split in records)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:16]


def read_json_roundtrip(value):
    """``value`` as it reads back from JSON (tuples → lists, other objects → str), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def has_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)


def stage_record(inputs: dict) -> dict:
    """What a stage records about its inputs, as it reads back from JSON."""
    return {"inputs": read_json_roundtrip(inputs)}


def changed_inputs(record: dict | None, inputs: dict) -> list[str]:
    """The names of the inputs that differ from those ``record`` was made from."""
    stored, current = (record or {}).get("inputs") or {}, read_json_roundtrip(inputs)
    return sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))


def inputs_stale_reason(record: dict | None, inputs: dict, missing: str) -> str | None:
    """None when ``record`` was made from ``inputs``; else ``missing`` (no record) or which changed."""
    if record is None:
        return missing
    changed = changed_inputs(record, inputs)
    return f"made from other inputs ({', '.join(changed)} changed)" if changed else None


def data_digest(data) -> str:
    """A short hash that identifies training data in records: of the token shards' files (their
    digests, in order, and the tokenizer's identity) for ``slimlm.shards.TokenShards``, of the
    documents for a list of texts (``texts_digest``)."""
    from slimlm.shards import TokenShards

    if not isinstance(data, TokenShards):
        return texts_digest(data)
    manifest = data.manifest
    content = [manifest.get("tokenizer"), [(shard["tokens_sha256"], shard["docs_sha256"]) for shard in manifest["shards"]]]
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()[:16]
