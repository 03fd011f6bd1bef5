"""The masked row-wise cosine op (block influence): backends, fake implementation, argument checks.

``masked_row_cosine(a, b, mask)`` gives, for every position of two (..., C) tensors,
Σ a·b / max(‖a‖·‖b‖, eps) in fp32, and 0 where ``mask`` is false. Not differentiable:
inputs are detached.
"""
from __future__ import annotations

import torch

from slimlm.kernels import reference, registry


def _fake(a, b, mask, eps):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


OP = registry.declare("masked_row_cosine", reference=reference.masked_row_cosine, fake=_fake,
                      triton_module="slimlm.kernels.triton.masked_row_cosine")


def masked_row_cosine(
    a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8, backend: str | None = None
) -> torch.Tensor:
    """fp32 cosine similarity along the last dimension, shape ``a.shape[:-1]``; 0 where ``mask`` is false.

    ``a`` and ``b``: same shape, dtype and device; ``mask``: shape ``a.shape[:-1]`` (bool or
    integer, 1 = counts) or None. fp64 input runs the reference and returns fp64.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() < 1:
        raise ValueError("a and b must be tensors with a channel dimension")
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(
            f"a and b must match in shape, dtype and device, got {tuple(a.shape)} {a.dtype} {a.device} "
            f"and {tuple(b.shape)} {b.dtype} {b.device}"
        )
    if not a.is_floating_point():
        raise ValueError(f"a and b must be floating tensors, got {a.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(a.shape[:-1]):
        raise ValueError(f"mask must have shape {tuple(a.shape[:-1])}, got {tuple(mask.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    leading = a.shape[:-1]
    a2 = a.detach().reshape(-1, a.shape[-1]).contiguous()
    b2 = b.detach().reshape(-1, b.shape[-1]).contiguous()
    mask1 = mask.detach().reshape(-1).to(torch.bool).contiguous() if mask is not None else None
    return OP(a2, b2, mask1, float(eps), backend=backend).reshape(leading)
