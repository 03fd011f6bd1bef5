"""Triton kernel of ``masked_row_cosine``: Σ a·b / max(‖a‖·‖b‖, eps) per row of two (N, C) tensors.

One program per block of rows; it streams the channels in BLOCK_C chunks and keeps three
fp32 running sums per row (a·b, a², b²). Masked rows load nothing and write 0.
"""
from __future__ import annotations

import torch

import slimlm.kernels.masked_row_cosine  # noqa: F401  (declares the op this is the Triton form of)
from slimlm.kernels import registry
from slimlm.kernels.triton.runtime import tl, triton

if triton is None:
    raise ImportError("slimlm.kernels.triton.masked_row_cosine needs Triton (not importable here)")


@triton.jit
def _masked_row_cosine_kernel(
    a_ptr,
    b_ptr,
    mask_ptr,
    out_ptr,
    rows,
    channels,
    eps,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = row < rows
    row_ok = in_range
    if HAS_MASK:
        row_ok = row_ok & (tl.load(mask_ptr + row, mask=in_range, other=0) != 0)
    dot = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_R], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    for start in range(0, channels, BLOCK_C):
        column = start + tl.arange(0, BLOCK_C)
        offsets = row[:, None] * channels + column[None, :]
        ok = row_ok[:, None] & (column[None, :] < channels)
        a = tl.load(a_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        dot += tl.sum(a * b, axis=1)
        sum_a += tl.sum(a * a, axis=1)
        sum_b += tl.sum(b * b, axis=1)
    cosine = dot / tl.maximum(tl.sqrt(sum_a) * tl.sqrt(sum_b), eps)
    tl.store(out_ptr + row, tl.where(row_ok, cosine, 0.0), mask=in_range)


@registry.triton_op("masked_row_cosine")
def masked_row_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Same contract as ``reference.masked_row_cosine`` for contiguous (N, C) fp32/bf16/fp16 inputs."""
    rows, channels = a.shape
    out = torch.empty(rows, dtype=torch.float32, device=a.device)
    if rows == 0:
        return out
    block_c = max(16, min(triton.next_power_of_2(channels), 1024))
    block_r = max(1, min(triton.next_power_of_2(rows), 4096 // block_c))
    mask_arg = mask.view(torch.uint8) if mask is not None else a
    _masked_row_cosine_kernel[(triton.cdiv(rows, block_r),)](
        a, b, mask_arg, out, rows, channels, eps, HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_C=block_c
    )
    return out
