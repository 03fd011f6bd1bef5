"""Model identity: which model (shape and weights) an artefact was computed on.

Importance scores, pruning records, checkpoints offered for resume, synthetic-data manifests
and a run's stage records carry the fingerprint of their model, and using them with another
model is an error (or a stale stage). The fingerprint covers every weight: two models that
differ in one element of one matrix are two models.
"""
from __future__ import annotations

import hashlib
import json

import torch

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
# Elements hashed per step: bounds the host copy of a large tensor on an accelerator.
_CHUNK = 1 << 24


def model_fingerprint(model, dtype=None) -> str:
    """Identifies a model's shape and weights: its shape-deciding config fields plus a BLAKE2
    digest of every tensor of its ``state_dict`` (name, shape, dtype and bytes; a tensor tied
    to an earlier one is hashed as that reference). ``dtype``: the fingerprint of the model
    cast to it (what reloading its checkpoint saved in that dtype gives).

    Computed afresh on every call (~0.9 GB/s of weights, BENCHMARKS.md): a cache keyed by the
    tensors' version counters would miss the updates of a fused optimizer and of ``.data``
    writes, which do not bump them."""
    config = model.config
    state = [(name, tensor) for name, tensor in model.state_dict(keep_vars=True).items()
             if isinstance(tensor, torch.Tensor)]
    return _digest(state, json.dumps({k: getattr(config, k, None) for k in SHAPE_FIELDS}, sort_keys=True,
                                     default=str), dtype)


def _digest(state, shape_fields: str, dtype) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(shape_fields.encode())
    seen: dict[tuple, str] = {}
    with torch.no_grad():
        for name, tensor in state:
            tensor = tensor.detach()
            # Ties are told from the tensors as they are (alive in ``state``), never from cast copies,
            # whose freed memory the next copy may reuse.
            identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            header = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}"
            if tensor.device.type == "meta":
                digest.update(f"{header}|meta".encode())
                continue
            if identity in seen and tensor.data_ptr() != 0:
                digest.update(f"{header}|tied to {seen[identity]}".encode())
                continue
            seen[identity] = name
            digest.update(header.encode())
            flat = tensor.reshape(-1)
            for start in range(0, flat.numel(), _CHUNK):
                chunk = flat[start:start + _CHUNK].contiguous().cpu()
                digest.update(chunk.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
