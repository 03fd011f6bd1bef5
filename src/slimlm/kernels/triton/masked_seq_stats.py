"""Triton kernel of ``masked_seq_stats``: per-sample sequence sums of masked (B, S, C) activations.

One program per (sample, block of groups). It walks the sequence in (BLOCK_S, BLOCK_G,
BLOCK_D) tiles — tokens × groups × channels of a group (BLOCK_D = 1 for plain channels) —
reduces each group to its value v (the channel, or the group's L2 norm) in fp32, and
accumulates Σ v, Σ |v|, Σ v² per group. Masked tokens load nothing. Each sample's sums
come from one program, so results do not depend on scheduling (no atomics).
"""
from __future__ import annotations

import torch

import slimlm.kernels.masked_seq_stats  # noqa: F401  (declares the op this is the Triton form of)
from slimlm.kernels import registry
from slimlm.kernels.triton.runtime import tl, triton

if triton is None:
    raise ImportError("slimlm.kernels.triton.masked_seq_stats needs Triton (not importable here)")


@triton.jit
def _masked_seq_stats_kernel(
    x_ptr,
    mask_ptr,
    out_ptr,
    seq,
    channels,
    groups,
    plane,
    GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    column = offs_g[:, None] * GROUP + offs_d[None, :]
    column_ok = (offs_g[:, None] < groups) & (offs_d[None, :] < GROUP)
    acc_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_abs = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK_G], dtype=tl.float32)
    for start in range(0, seq, BLOCK_S):
        token = start + offs_s
        token_ok = token < seq
        if HAS_MASK:
            token_ok = token_ok & (tl.load(mask_ptr + b * seq + token, mask=token < seq, other=0) != 0)
        row = (b * seq + token).to(tl.int64) * channels
        ptrs = x_ptr + row[:, None, None] + column[None, :, :]
        x = tl.load(ptrs, mask=token_ok[:, None, None] & column_ok[None, :, :], other=0.0).to(tl.float32)
        if GROUP == 1:
            value = tl.sum(x, axis=2)
            square = value * value
        else:
            square = tl.sum(x * x, axis=2)
            value = tl.sqrt(square)
        acc_sum += tl.sum(value, axis=0)
        acc_abs += tl.sum(tl.abs(value), axis=0)
        acc_sq += tl.sum(square, axis=0)
    out = out_ptr + b * groups + offs_g
    keep = offs_g < groups
    tl.store(out, acc_sum, mask=keep)
    tl.store(out + plane, acc_abs, mask=keep)
    tl.store(out + 2 * plane, acc_sq, mask=keep)


@registry.triton_op("masked_seq_stats")
def masked_seq_stats(x: torch.Tensor, mask: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Same contract as ``reference.masked_seq_stats`` for contiguous (B, S, C) fp32/bf16/fp16 ``x``."""
    batch, seq, channels = x.shape
    groups = channels // group_size
    out = torch.empty((3, batch, groups), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    block_d = triton.next_power_of_2(group_size)
    block_g = max(1, min(triton.next_power_of_2(groups), 1024 // block_d))
    # About 4K elements per tile: enough loads in flight per program, few registers.
    block_s = max(1, min(triton.next_power_of_2(seq), 4096 // (block_g * block_d), 64))
    mask_arg = mask.view(torch.uint8) if mask is not None else x
    grid = (batch, triton.cdiv(groups, block_g))
    _masked_seq_stats_kernel[grid](
        x, mask_arg, out, seq, channels, groups, batch * groups,
        GROUP=group_size, HAS_MASK=mask is not None, BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_D=block_d,
    )
    return out
