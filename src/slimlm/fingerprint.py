"""Model identity: which model (shape and weights) an artefact was computed on.

Importance scores, pruning records, checkpoints offered for resume, synthetic-data manifests
and a run's stage records carry the fingerprint of their model, and using them with another
model is an error (or a stale stage). The fingerprint covers every weight: two models that
differ in one element of one matrix are two models.
"""
from __future__ import annotations

import concurrent.futures
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
    """Identifies a model's shape and weights: its shape-deciding config fields plus a SHA-256
    digest of every tensor of its ``state_dict`` (name, shape, dtype and bytes; a tensor tied
    to an earlier one is hashed as that reference). ``dtype``: the fingerprint of the model
    cast to it (what reloading its checkpoint saved in that dtype gives).

    Computed afresh on every call, the tensors hashed in parallel (``torch.get_num_threads()``
    threads; hashlib releases the GIL); BENCHMARKS.md has the cost. A cache keyed by the tensors'
    version counters would miss the updates of a fused optimizer and of ``.data`` writes, which
    do not bump them."""
    config = model.config
    state = [(name, tensor.detach()) for name, tensor in model.state_dict(keep_vars=True).items()
             if isinstance(tensor, torch.Tensor)]
    digest = hashlib.sha256(json.dumps({k: getattr(config, k, None) for k in SHAPE_FIELDS}, sort_keys=True,
                                       default=str).encode())
    # Ties are told from the tensors as they are, never from cast copies.
    first_of: dict[tuple, str] = {}
    hashed = []
    for name, tensor in state:
        identity = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        tied = first_of.get(identity) if tensor.data_ptr() != 0 else None
        first_of.setdefault(identity, name)
        hashed.append((name, tensor, tied))
    with concurrent.futures.ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        parts = pool.map(lambda item: _tensor_part(*item, dtype), hashed)
        for part in parts:
            digest.update(part)
    return digest.hexdigest()[:16]


def _tensor_part(name: str, tensor: torch.Tensor, tied: str | None, dtype) -> bytes:
    """What one tensor adds to the fingerprint: its header and the digest of its bytes."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    header = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|"
    if tensor.device.type == "meta":
        return (header + "meta").encode()
    if tied is not None:
        return (header + f"tied to {tied}").encode()
    digest = hashlib.sha256()
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        digest.update(flat[start:start + _CHUNK].contiguous().cpu().view(torch.uint8).numpy())
    return header.encode() + digest.digest()
