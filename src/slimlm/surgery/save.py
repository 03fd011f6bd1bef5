"""``save_pruned``: write a pruned model as a standard checkpoint, atomically.

The checkpoint is written to a staging sibling and swapped into place
(``slimlm.outputs.atomic_output``), so an interrupted save leaves the previous folder (or
nothing) at the output path, never a half-written checkpoint. ``slimlm_prune.json`` beside
the weights records the plan, the kept layers and the fingerprints of the source and the
pruned model.
"""
from __future__ import annotations

import json
import os

from slimlm import models, outputs
from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint
from slimlm.surgery.apply import sync_with_config

RECORD_FILE = "slimlm_prune.json"


def _describe(folder: str) -> str:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        return f"{len(os.listdir(folder))} entries and no config.json"
    try:
        with open(config_path) as handle:
            config = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return "an unreadable config.json"
    return (f"a {config.get('model_type')} model (hidden_size={config.get('hidden_size')}, "
            f"num_hidden_layers={config.get('num_hidden_layers')})")


def _holds_this_model(folder: str, fingerprint: str) -> bool:
    try:
        with open(os.path.join(folder, RECORD_FILE)) as handle:
            return json.load(handle).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def save_pruned(model, path: str | os.PathLike, *, tokenizer=None, overwrite: bool = False,
                max_shard_size: str | int = "5GB", record: dict | None = None, save_dtype=None) -> str:
    """Save ``model`` (and ``tokenizer``) to ``path`` as safetensors + config that
    ``AutoModelForCausalLM.from_pretrained`` loads with stock transformers; returns the path.

    ``save_dtype``: "float32" | "bfloat16" | "float16"; None or "auto" (the default) saves in the
    dtype the source checkpoint declares (``slimlm.models.save_dtype``: bfloat16 for SmolLM2's
    quantized GGUF), whatever dtype the model runs in; config.json states it, and the model in
    memory is not cast. The tokenizer files load in transformers 4.x and llama.cpp's converter too
    (``slimlm.models.save_tokenizer``).

    ``record``: more fields for ``slimlm_prune.json`` (what the model was pruned from).

    Refuses (ValueError): the folder the model was loaded from, one containing it or one
    inside it, even with ``overwrite``; an existing non-empty folder holding anything but
    this same model, unless ``overwrite=True``; a config that disagrees with the weights. A GGUF-loaded model
    (weights already plain tensors) loses its GGUF quantizer first, as ``save_pretrained``
    refuses it otherwise.
    """
    path = outputs.resolve(path)
    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    # A model folder (a GGUF file's folder is not one: its name_or_path is the folder around it).
    if source and os.path.isfile(os.path.join(source, "config.json")):
        if outputs.overlaps(path, source):
            raise InputError(f"refusing to save into {path}: the model was loaded from {source}, "
                             "which it would overwrite or write into")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{path} exists and is not a folder")
    sync_with_config(model, check_only=True)
    dtype = models.save_dtype(model, save_dtype)
    fingerprint = model_fingerprint(model, dtype)
    replace = os.path.isdir(path) and bool(os.listdir(path))
    if replace and overwrite and not outputs.owned(path):
        raise InputError(f"{path} exists and was not written by slimlm; refusing to replace it even with --overwrite "
                         "/ overwrite=True (choose another path or remove it yourself)")
    if replace and not overwrite and not _holds_this_model(path, fingerprint):
        raise InputError(f"{path} already holds {_describe(path)}; pass --overwrite (overwrite=True in Python) to "
                         "replace it")

    models.as_plain_model(model)
    with outputs.atomic_output(path) as staging:
        models.write_checkpoint(model, staging, dtype=dtype, tokenizer=tokenizer, max_shard_size=max_shard_size)
        fields = {"fingerprint": fingerprint, **(getattr(model, "slimlm_prune_record", None) or {}), **(record or {})}
        outputs.write_json(os.path.join(staging, RECORD_FILE), fields)
    return path
