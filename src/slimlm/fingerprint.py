"""Model identity: which model (shape and weights) an artefact was computed on.

Importance scores, pruning records and synthetic-data manifests carry the fingerprint of
their model, and loading them against another model is an error.
"""
from __future__ import annotations

import hashlib
import json

# Config fields that decide the shape of every score tensor and of the weights.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "head_dim",
    "vocab_size",
)


def model_fingerprint(model, dtype=None) -> str:
    """Identifies a model's shape and weights: its shape-deciding config fields plus a
    hash of the first rows of its input embedding (cheap, and differs between checkpoints).
    ``dtype``: the fingerprint of the model cast to it (what reloading its checkpoint saved in
    that dtype gives)."""
    config = model.config
    digest = hashlib.sha256()
    digest.update(json.dumps({k: getattr(config, k, None) for k in SHAPE_FIELDS}, sort_keys=True).encode())
    embedding = model.get_input_embeddings().weight[:8].detach()
    if dtype is not None:
        embedding = embedding.to(dtype)
    digest.update(embedding.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
