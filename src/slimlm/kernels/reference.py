"""Pure-PyTorch definitions of every slimlm op: the meaning of "correct" for all backends.

These are written to be read, not to be fast. Each backend is tested against them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl_from_logs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(A‖B) = Σ a (log a − log b), with 0 · log 0 = 0."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))).sum(-1)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """Per-row distillation divergence between softmax(teacher/τ) = P and softmax(student/τ) = Q.

    β = 0: forward KL(P‖Q); β = 1: reverse KL(Q‖P); 0 < β < 1: generalised JSD
    β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q (the TRL/Liger convention).
    Computed in fp32 (fp64 stays fp64); log M = logaddexp(log β + log P, log(1−β) + log Q).
    """
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student.to(compute_dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher.to(compute_dtype) / temperature, dim=-1)
    if beta == 0.0:
        return _kl_from_logs(log_p, log_q)
    if beta == 1.0:
        return _kl_from_logs(log_q, log_p)
    # Where P = Q = 0 (masked vocabulary) log M is -inf and logaddexp's gradient is 0/0;
    # those entries contribute nothing, so any finite stand-in keeps the gradient clean.
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_m = torch.logaddexp(
        torch.where(both_zero, 0.0, log_p) + math.log(beta), torch.where(both_zero, 0.0, log_q) + math.log1p(-beta)
    )
    return beta * _kl_from_logs(log_p, log_m) + (1.0 - beta) * _kl_from_logs(log_q, log_m)


def valid_rows(labels: torch.Tensor | None, num_rows: int, ignore_index: int, device: torch.device) -> torch.Tensor:
    """Boolean (N,) mask of rows that count: label != ignore_index (all rows without labels)."""
    if labels is None:
        return torch.ones(num_rows, dtype=torch.bool, device=device)
    return labels.reshape(-1) != ignore_index


def kl_div_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    beta: float,
    scale: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.slimlm.kl_div_fwd`` on 2-D (N, V) logits.

    Returns (scale · divergence per row, fp32 with ignored rows 0;
    d(sum of those rows)/d student in the student's dtype, or an empty tensor).
    """
    valid = valid_rows(labels, student.shape[0], ignore_index, student.device)
    with torch.enable_grad():
        leaf = student.detach().requires_grad_(compute_grad)
        rows = divergence_rows(leaf, teacher.detach(), temperature, beta) * scale
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        grad = torch.autograd.grad(rows.sum(), leaf)[0].to(student.dtype) if compute_grad else student.new_empty(0)
    return rows.detach().to(torch.float64 if student.dtype == torch.float64 else torch.float32), grad
