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


def softmax_undefined(x: torch.Tensor) -> torch.Tensor:
    """(N,) rows of (N, V) ``x`` whose softmax is undefined: a NaN or +inf entry, or all -inf."""
    return torch.isnan(x).any(-1) | torch.isposinf(x).any(-1) | torch.isneginf(x).all(-1)


def _nan_where(undefined: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss rows and gradient rows set to NaN where ``undefined`` (N,) holds: every backend gives
    a whole NaN row there, rather than whichever mix of NaN and 0 autograd would produce."""
    rows = torch.where(undefined, torch.full_like(rows, float("nan")), rows)
    if grad.numel():
        grad = torch.where(undefined.reshape(-1, 1), torch.full_like(grad, float("nan")), grad)
    return rows, grad


def _counted(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with its ignored rows replaced by zeros: an ignored row is never read, so a NaN
    there reaches neither the loss nor (through softmax's backward) the gradient."""
    return torch.where(valid.reshape(-1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))


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
    d(sum of those rows)/d student in the student's dtype, or an empty tensor). Ignored rows are
    never read; a row whose softmax is undefined (a NaN or +inf logit, or all -inf) is NaN.
    """
    valid = valid_rows(labels, student.shape[0], ignore_index, student.device)
    with torch.enable_grad():
        leaf = student.detach().requires_grad_(compute_grad)
        rows = divergence_rows(_counted(leaf, valid), _counted(teacher.detach(), valid), temperature, beta) * scale
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        grad = torch.autograd.grad(rows.sum(), leaf)[0].to(student.dtype) if compute_grad else student.new_empty(0)
    undefined = valid & (softmax_undefined(student) | softmax_undefined(teacher))
    rows, grad = _nan_where(undefined, rows.detach(), grad)
    return rows.to(torch.float64 if student.dtype == torch.float64 else torch.float32), grad


def masked_seq_stats(x: torch.Tensor, mask: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """Reference of ``torch.ops.slimlm.masked_seq_stats``: per-sample sequence sums of (B, S, C) activations.

    v[b, s, j] = x[b, s, j] when ``group_size`` is 1, else the L2 norm of channels
    j·g … j·g + g − 1 (g = ``group_size``: a head's slice of a (B, S, H·D) tensor).
    Returns fp32 (fp64 for fp64 input) of shape (3, B, C / g): over the tokens s with
    ``mask[b, s]`` true (all tokens without a mask), Σ_s v, Σ_s |v|, Σ_s v².
    Masked tokens are never read into the sums (NaN there does not leak).
    """
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    batch, seq, channels = x.shape
    values = x.to(compute_dtype)
    if group_size > 1:
        values = values.reshape(batch, seq, channels // group_size, group_size).square().sum(-1).sqrt()
    if mask is not None:
        values = torch.where(mask.reshape(batch, seq, 1).bool(), values, torch.zeros((), dtype=compute_dtype))
    return torch.stack([values.sum(1), values.abs().sum(1), values.square().sum(1)])


def masked_row_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Reference of ``torch.ops.slimlm.masked_row_cosine`` on 2-D (N, C) inputs.

    cos[n] = Σ_c a·b / max(‖a_n‖·‖b_n‖, eps), accumulated in fp32 (fp64 stays fp64);
    rows with ``mask[n]`` false are 0.
    """
    compute_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(compute_dtype), b.to(compute_dtype)
    norms = a.square().sum(-1).sqrt() * b.square().sum(-1).sqrt()
    cosine = (a * b).sum(-1) / norms.clamp_min(eps)
    if mask is not None:
        cosine = torch.where(mask.reshape(-1).bool(), cosine, torch.zeros((), dtype=compute_dtype))
    return cosine


def topk_bucket_logprobs(
    student: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, temperature: float, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities on the teacher's top-k support, (N, k) or (N, k + 1).

    The student is log_softmax(student / τ) over the full vocabulary, gathered at the indices.
    ``renormalize``: the teacher's top-k is renormalised to sum to 1 and the student's full-vocab
    log-probs are used as they are (no tail). Otherwise both get a last "tail" bucket holding the
    mass outside the top-k, 1 − Σ exp(top-k), clamped at the dtype's smallest normal number.
    """
    compute_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(student.to(compute_dtype) / temperature, dim=-1).gather(-1, topk_indices.long())
    log_p = topk_logprobs.to(compute_dtype)
    if renormalize:
        return log_p - torch.logsumexp(log_p, dim=-1, keepdim=True), log_q
    tiny = torch.finfo(compute_dtype).tiny
    tail_p = (1.0 - log_p.exp().sum(-1, keepdim=True)).clamp(min=tiny).log()
    tail_q = (1.0 - log_q.exp().sum(-1, keepdim=True)).clamp(min=tiny).log()
    return torch.cat([log_p, tail_p], -1), torch.cat([log_q, tail_q], -1)


def divergence_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """``divergence_rows``'s D(P‖Q) for already-normalised log-probabilities (no softmax)."""
    if beta == 0.0:
        return _kl_from_logs(log_p, log_q)
    if beta == 1.0:
        return _kl_from_logs(log_q, log_p)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * _kl_from_logs(log_p, log_m) + (1.0 - beta) * _kl_from_logs(log_q, log_m)


def topk_kl_fwd(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    beta: float,
    scale: float,
    renormalize: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``torch.ops.slimlm.topk_kl_fwd``: the sparse-teacher divergence of (N, V) logits.

    Teacher: (N, k) log-probabilities log softmax(t / τ) at (N, k) distinct vocabulary indices.
    Returns (scale · D per row over ``topk_bucket_logprobs``'s support, fp32, ignored rows 0;
    d(sum of rows)/d student in the student's dtype, or an empty tensor). ``renormalize``
    supports forward KL only (β = 0). Ignored rows are never read; a row whose student softmax is
    undefined (a NaN or +inf logit, or all -inf) or whose teacher log-probs hold a NaN or +inf is NaN.
    """
    valid = valid_rows(labels, student.shape[0], ignore_index, student.device)
    with torch.enable_grad():
        leaf = student.detach().requires_grad_(compute_grad)
        log_p, log_q = topk_bucket_logprobs(_counted(leaf, valid), _counted(topk_logprobs.detach(), valid),
                                            topk_indices, temperature, renormalize)
        rows = divergence_from_logprobs(log_p, log_q, beta) * scale
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        grad = torch.autograd.grad(rows.sum(), leaf)[0].to(student.dtype) if compute_grad else student.new_empty(0)
    bad_teacher = torch.isnan(topk_logprobs).any(-1) | torch.isposinf(topk_logprobs).any(-1)
    undefined = valid & (softmax_undefined(student) | bad_teacher)
    rows, grad = _nan_where(undefined, rows.detach(), grad)
    return rows.to(torch.float64 if student.dtype == torch.float64 else torch.float32), grad
