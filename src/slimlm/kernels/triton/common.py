"""What the Triton op files share: ``@triton.jit`` helpers and the host-side launch helpers
(imported only where Triton is)."""
from __future__ import annotations

import torch

from slimlm.kernels.triton import runtime
from slimlm.kernels.triton.runtime import tl, triton

if triton is None:
    raise ImportError("slimlm.kernels.triton.common needs Triton (not importable here)")

# Which divergence a launch computes (a compile-time switch of the kernels).
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
LOG2E = tl.constexpr(1.4426950408889634)


def divergence_kind(beta: float) -> int:
    """β = 0: forward KL; β = 1: reverse KL; else the generalised JSD (the TRL/Liger convention)."""
    if beta == 0.0:
        return FORWARD_KL.value
    if beta == 1.0:
        return REVERSE_KL.value
    return JSD.value


def gradient_buffer(grad: torch.Tensor, student: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    """Where a kernel writes its gradient: ``grad`` itself, except interpreted with bf16, where the
    interpreter truncates fp32 → bf16 (the GPU rounds to nearest even, as torch does): an fp32
    buffer then, rounded into ``grad`` by ``finish_gradient``."""
    if compute_grad and student.dtype == torch.bfloat16 and runtime.interpreted():
        return torch.empty(student.shape, dtype=torch.float32, device=student.device)
    return grad


def finish_gradient(grad: torch.Tensor, buffer: torch.Tensor) -> None:
    if buffer is not grad:
        grad.copy_(buffer)


@triton.jit
def poisons_softmax(x):
    """1 where x is NaN or +inf (either makes its row's softmax undefined: the row is NaN), else 0."""
    return ((x != x) | (x == float("inf"))).to(tl.int32)


@triton.jit
def log_mixture(log_p, log_q, log_beta, log_1m_beta):
    """log M = logaddexp(log β + log P, log(1 − β) + log Q), never the log of a sum.

    Where P = Q = 0 it returns 0 instead of -inf: those entries are weighted by P = Q = 0,
    and a finite stand-in keeps every intermediate free of -inf − (-inf).
    """
    x1 = log_p + log_beta
    x2 = log_q + log_1m_beta
    hi = tl.maximum(x1, x2)
    hi = tl.where(hi == float("-inf"), 0.0, hi)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(x1, x2) - hi))
