"""The masked row-wise cosine op (block influence): backends, fake implementation, argument checks.

``masked_row_cosine(a, b, mask)`` gives, for every position of two (..., C) tensors,
Σ a·b / max(‖a‖·‖b‖, eps) in fp32, and 0 where ``mask`` is false. Not differentiable:
inputs are detached.
"""
from __future__ import annotations

import torch

from slimlm import _extension
from slimlm.kernels import dispatch, reference


def _compiled(a, b, mask, eps):
    return torch.ops.slimlm.masked_row_cosine(a, b, mask, eps)


def _triton(a, b, mask, eps):
    from slimlm.kernels.triton import masked_row_cosine as triton_masked_row_cosine

    return triton_masked_row_cosine.masked_row_cosine(a, b, mask, eps)


def _impls() -> dict:
    impls = {"torch": reference.masked_row_cosine, "triton": _triton}
    if _extension.has_op("masked_row_cosine"):
        impls["cpu"] = _compiled
        impls["cuda"] = _compiled
    return impls


if _extension.has_op("masked_row_cosine"):

    @torch.library.register_fake("slimlm::masked_row_cosine")
    def _masked_row_cosine_fake(a, b, mask, eps):
        return a.new_empty((a.shape[0],), dtype=torch.float32)


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
    impls = _impls()
    if a.dtype == torch.float64:
        impls = {"torch": impls["torch"]}
        backend = "torch"
    return dispatch.run("masked_row_cosine", impls, a.device, a2, b2, mask1, float(eps), backend=backend).reshape(leading)
