"""Triton kernels of ``kl_div_fwd``: per-row distillation divergence and its student gradient.

One program per row. With a = s/τ, b = t/τ, log Q = a − lse(a), log P = b − lse(b):

- pass 1 streams the row once for the running max and Σ exp of both sides, and for
  β ∈ {0, 1} the loss as well: KL(P‖Q) = Σ P (t − s)/τ − (max t − max s)/τ − log Z_t + log Z_s,
  whose first sum rescales like Z_t (reverse KL mirrors it), so the KL losses need no
  second look at the row;
- pass 2 writes the gradient (forward KL (Q − P)/τ, reverse KL Q (log Q − log P − L)/τ),
  or for the JSD accumulates KL(P‖M) and KL(Q‖M);
- pass 3 (JSD with a gradient only) writes (1 − β) Q (log Q − log M − KL(Q‖M))/τ.
All times ``scale``. Traffic: forward/reverse KL read s and t twice and write the
gradient once (5·N·V elements), JSD reads them three times (7·N·V).
"""
from __future__ import annotations

import math

import torch

import slimlm.kernels.kl_div  # noqa: F401  (declares the op this is the Triton form of)
from slimlm.kernels import registry
from slimlm.kernels.triton.common import (
    FORWARD_KL,
    JSD,
    LOG2E,
    REVERSE_KL,
    divergence_kind,
    finish_gradient,
    gradient_buffer,
    log_mixture,
    poisons_softmax,
)
from slimlm.kernels.triton.runtime import tl, triton


@triton.jit
def _absorb(x, run_max, run_sum, exp2_scale):
    """Online log-sum-exp step over one block: returns (new max, rescaled Σ, rescale factor, exp terms)."""
    new_max = tl.maximum(run_max, tl.max(x, axis=0))
    # While every logit seen is -inf the shift must stay finite: exp(-inf - -inf) would be NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp2((run_max - shift) * exp2_scale)
    terms = tl.exp2((x - shift) * exp2_scale)
    return new_max, run_sum * alpha + terms, alpha, terms


@triton.jit
def _rescale(acc, alpha):
    # An infinite divergence term stays infinite even if its weight's rescale underflows to 0.
    return tl.where(acc == float("inf"), acc, acc * alpha)


@triton.jit
def _gap(x, y, keep):
    """x − y where ``keep``, else 0, without ever forming -inf − (-inf)."""
    return tl.where(keep, x, 0.0) - tl.where(keep, y, 0.0)


@triton.jit
def _kl_div_fwd_kernel(
    student_ptr,
    teacher_ptr,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    vocab,
    ignore_index,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    scale,
    DIVERGENCE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * vocab
    t_row = teacher_ptr + row * vocab
    g_row = grad_ptr + row * vocab
    cols = tl.arange(0, BLOCK)
    num_blocks = tl.cdiv(vocab, BLOCK)

    valid = True
    if HAS_LABELS:
        valid = tl.load(labels_ptr + row) != ignore_index

    if valid:
        exp2_scale = inv_temperature * LOG2E
        s_max = float("-inf")
        t_max = float("-inf")
        s_sum = tl.zeros([BLOCK], dtype=tl.float32)
        t_sum = tl.zeros([BLOCK], dtype=tl.float32)
        cross = tl.zeros([BLOCK], dtype=tl.float32)
        poisoned = tl.zeros([BLOCK], dtype=tl.int32)
        for block in range(0, num_blocks):
            offs = block * BLOCK + cols
            mask = offs < vocab
            s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            poisoned = poisoned | poisons_softmax(s) | poisons_softmax(t)
            s_max, s_sum, s_alpha, s_terms = _absorb(s, s_max, s_sum, exp2_scale)
            t_max, t_sum, t_alpha, t_terms = _absorb(t, t_max, t_sum, exp2_scale)
            if DIVERGENCE == FORWARD_KL:
                cross = _rescale(cross, t_alpha) + t_terms * _gap(t, s, t_terms > 0)
            elif DIVERGENCE == REVERSE_KL:
                cross = _rescale(cross, s_alpha) + s_terms * _gap(s, t, s_terms > 0)
        # NaN, +inf or an all -inf row on either side: the row is NaN, as in the reference.
        undefined = (tl.max(poisoned, axis=0) > 0) | (s_max == float("-inf")) | (t_max == float("-inf"))
        s_total = tl.sum(s_sum, axis=0)
        t_total = tl.sum(t_sum, axis=0)
        log_zs = tl.log(s_total)
        log_zt = tl.log(t_total)
        grad_scale = scale * inv_temperature

        if DIVERGENCE == FORWARD_KL:
            divergence = (tl.sum(cross, axis=0) / t_total - (t_max - s_max)) * inv_temperature + (log_zs - log_zt)
        elif DIVERGENCE == REVERSE_KL:
            mean_gap = tl.sum(cross, axis=0) / s_total
            divergence = (mean_gap - (s_max - t_max)) * inv_temperature + (log_zt - log_zs)
        else:
            kl_pm = tl.zeros([BLOCK], dtype=tl.float32)
            kl_qm = tl.zeros([BLOCK], dtype=tl.float32)
            # Backwards, so the blocks pass 1 read last are re-read while still in cache.
            for i in range(0, num_blocks):
                offs = (num_blocks - 1 - i) * BLOCK + cols
                mask = offs < vocab
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                log_q = (s - s_max) * inv_temperature - log_zs
                log_p = (t - t_max) * inv_temperature - log_zt
                log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
                q = tl.exp(log_q)
                p = tl.exp(log_p)
                kl_pm += p * tl.where(p > 0, log_p - log_m, 0.0)
                kl_qm += q * tl.where(q > 0, log_q - log_m, 0.0)
            kl_qm_total = tl.sum(kl_qm, axis=0)
            divergence = beta * tl.sum(kl_pm, axis=0) + (1.0 - beta) * kl_qm_total
            grad_scale = grad_scale * (1.0 - beta)
        tl.store(loss_ptr + row, tl.where(undefined, float("nan"), divergence * scale))

        if COMPUTE_GRAD:
            for i in range(0, num_blocks):
                if DIVERGENCE == JSD:
                    # Pass 2 ran backwards, so this pass runs forwards, again cache-first.
                    offs = i * BLOCK + cols
                else:
                    offs = (num_blocks - 1 - i) * BLOCK + cols
                mask = offs < vocab
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                t = tl.load(t_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                log_q = (s - s_max) * inv_temperature - log_zs
                log_p = (t - t_max) * inv_temperature - log_zt
                q = tl.exp(log_q)
                if DIVERGENCE == FORWARD_KL:
                    grad = q - tl.exp(log_p)
                elif DIVERGENCE == REVERSE_KL:
                    # log Q - log P - L = ((s - t) - E_Q[s - t]) / τ: the row constants cancel
                    # exactly, so where Q is one-hot the gradient is as small as it should be.
                    grad = tl.where(q > 0, q * (_gap(s, t, q > 0) - mean_gap) * inv_temperature, 0.0)
                else:
                    log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
                    grad = q * tl.where(q > 0, log_q - log_m - kl_qm_total, 0.0)
                grad = tl.where(undefined, float("nan"), grad * grad_scale)
                tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for block in range(0, num_blocks):
                offs = block * BLOCK + cols
                tl.store(g_row + offs, zeros, mask=offs < vocab)


@registry.triton_op("kl_div_fwd")
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
    """``slimlm::kl_div_fwd_triton`` on 2-D contiguous (N, V) logits (CUDA, or CPU when interpreted):
    the contract of ``reference.kl_div_fwd``. Allocates the outputs and launches one program per row."""
    rows, vocab = student.shape
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    if rows == 0:
        return loss, grad
    grad_out = gradient_buffer(grad, student, compute_grad)
    # 2048 columns over 8 warps: 8 values per thread per side (one 128-bit load of
    # 16-bit logits) at about 72 registers on sm_90, so three rows stay resident per SM
    # (4096 over 16 warps needs about 95 and fits one).
    block = min(triton.next_power_of_2(vocab), 2048)
    num_warps = max(1, min(8, block // 256))
    kind = divergence_kind(beta)
    log_beta = math.log(beta) if kind == JSD.value else 0.0
    log_1m_beta = math.log1p(-beta) if kind == JSD.value else 0.0
    _kl_div_fwd_kernel[(rows,)](
        student,
        teacher,
        labels if labels is not None else student,
        loss,
        grad_out if compute_grad else student,
        vocab,
        ignore_index,
        1.0 / temperature,
        beta,
        log_beta,
        log_1m_beta,
        scale,
        DIVERGENCE=kind,
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        num_warps=num_warps,
    )
    finish_gradient(grad, grad_out)
    return loss, grad
