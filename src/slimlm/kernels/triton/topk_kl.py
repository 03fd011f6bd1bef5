"""Triton kernel of ``topk_kl_fwd``: sparse-teacher divergence and its student gradient.

One program per row (math in ``slimlm.kernels.topk_kl``):
- pass 1 streams the row for the running max and Σ exp((s − max)/τ);
- the k teacher entries are one block: gather s at the indices, the tail bucket, the
  divergence and the per-index weights w_i and c = Σ w_i;
- pass 2 writes the dense part −scale/τ · c · q_u backwards (cache-first), then, after a
  barrier, the k gathered entries scale/τ · (w_i − c · q_i) over it.
Traffic: reads s twice, writes the gradient once, plus k-sized reads.
"""
from __future__ import annotations

import math

import torch

import slimlm.kernels.topk_kl  # noqa: F401  (declares the op this is the Triton form of)
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
# The tail buckets are clamped here, as the fp32 reference does (smallest normal fp32).
TINY = tl.constexpr(1.1754943508222875e-38)


@triton.jit
def _bucket_term(p, q, log_p, log_q, beta, log_beta, log_1m_beta, DIVERGENCE: tl.constexpr):
    """One bucket's divergence term and ∂D/∂q (0 where q = 0, whose weight q·∂D/∂q is 0)."""
    q_live = q > 0
    if DIVERGENCE == FORWARD_KL:
        term = tl.where(p > 0, p * (log_p - tl.where(p > 0, log_q, 0.0)), 0.0)
        dq = tl.where(q_live, -p / tl.where(q_live, q, 1.0), 0.0)
    elif DIVERGENCE == REVERSE_KL:
        term = tl.where(q_live, q * (log_q - tl.where(q_live, log_p, 0.0)), 0.0)
        dq = tl.where(q_live, log_q - log_p + 1.0, 0.0)
    else:
        log_m = log_mixture(log_p, log_q, log_beta, log_1m_beta)
        term = beta * tl.where(p > 0, p * (log_p - log_m), 0.0) + (1.0 - beta) * tl.where(
            q_live, q * (log_q - log_m), 0.0
        )
        dq = tl.where(q_live, (1.0 - beta) * (log_q - log_m), 0.0)
    return term, dq


@triton.jit
def _topk_kl_fwd_kernel(
    student_ptr,
    logprobs_ptr,
    indices_ptr,
    labels_ptr,
    loss_ptr,
    grad_ptr,
    vocab,
    k,
    ignore_index,
    inv_temperature,
    beta,
    log_beta,
    log_1m_beta,
    scale,
    DIVERGENCE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * vocab
    g_row = grad_ptr + row * vocab
    cols = tl.arange(0, BLOCK)
    num_blocks = tl.cdiv(vocab, BLOCK)

    valid = True
    if HAS_LABELS:
        valid = tl.load(labels_ptr + row) != ignore_index

    if valid:
        exp2_scale = inv_temperature * LOG2E
        run_max = float("-inf")
        run_sum = tl.zeros([BLOCK], dtype=tl.float32)
        poisoned = tl.zeros([BLOCK], dtype=tl.int32)
        for block in range(0, num_blocks):
            offs = block * BLOCK + cols
            s = tl.load(s_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            poisoned = poisoned | poisons_softmax(s)
            new_max = tl.maximum(run_max, tl.max(s, axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp2((run_max - shift) * exp2_scale) + tl.exp2((s - shift) * exp2_scale)
            run_max = new_max
        total = tl.sum(run_sum, axis=0)
        log_z = tl.log(total)

        kcols = tl.arange(0, BLOCK_K)
        idx = tl.load(indices_ptr + row * k + kcols, mask=kcols < k, other=0)
        # The Python layer checks the range, except inside torch.compile: an index outside the
        # row must never be read or written, and its row's loss becomes NaN.
        in_range = (idx >= 0) & (idx < vocab)
        out_of_range = tl.sum(tl.where((kcols < k) & ~in_range, 1, 0), axis=0) > 0
        kmask = (kcols < k) & in_range
        log_p = tl.load(logprobs_ptr + row * k + kcols, mask=kmask, other=float("-inf")).to(tl.float32)
        # An undefined student softmax (NaN, +inf, all -inf) or a NaN/+inf teacher log-prob: a NaN row.
        undefined = (
            (tl.max(poisoned, axis=0) > 0) | (run_max == float("-inf")) | (tl.max(poisons_softmax(log_p), axis=0) > 0)
        )
        s_top = tl.load(s_row + idx, mask=kmask, other=float("-inf")).to(tl.float32)
        log_q = (s_top - run_max) * inv_temperature - log_z
        q = tl.where(kmask, tl.exp(log_q), 0.0)
        if RENORMALIZE:
            p_max = tl.max(log_p, axis=0)
            log_pn = log_p - (p_max + tl.log(tl.sum(tl.where(kmask, tl.exp(log_p - p_max), 0.0), axis=0)))
            pn = tl.where(kmask, tl.exp(log_pn), 0.0)
            divergence = tl.sum(tl.where(pn > 0, pn * (log_pn - tl.where(pn > 0, log_q, 0.0)), 0.0), axis=0)
            weights = -pn
        else:
            p = tl.where(kmask, tl.exp(log_p), 0.0)
            # 1 − Σ cancels when the top-k holds nearly all the mass: summed in fp64, the
            # tails keep the digits that the reverse KL and the JSD amplify.
            # (exp in fp64 too: a top-1 probability of 1 − 5e-9 is 1.0 in fp32).
            q_rest = (1.0 - tl.sum(tl.where(kmask, tl.exp(log_q.to(tl.float64)), 0.0), axis=0)).to(tl.float32)
            q_tail = tl.maximum(q_rest, TINY)
            p_rest = 1.0 - tl.sum(tl.where(kmask, tl.exp(log_p.to(tl.float64)), 0.0), axis=0)
            p_tail = tl.maximum(p_rest.to(tl.float32), TINY)
            tail_term, tail_dq = _bucket_term(
                p_tail, q_tail, tl.log(p_tail), tl.log(q_tail), beta, log_beta, log_1m_beta, DIVERGENCE
            )
            # A clamped tail is a constant: no gradient flows through it.
            tail_dq = tl.where(q_rest > TINY, tail_dq, 0.0)
            terms, dq = _bucket_term(p, q, log_p, log_q, beta, log_beta, log_1m_beta, DIVERGENCE)
            divergence = tail_term + tl.sum(tl.where(kmask, terms, 0.0), axis=0)
            weights = tl.where(kmask & (q > 0), q * (dq - tail_dq), 0.0)
        c = tl.sum(weights, axis=0)
        tl.store(loss_ptr + row, tl.where(out_of_range | undefined, float("nan"), divergence * scale))

        if COMPUTE_GRAD:
            step = scale * inv_temperature
            dense = -step * c / total
            for i in range(0, num_blocks):
                offs = (num_blocks - 1 - i) * BLOCK + cols
                mask = offs < vocab
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                grad = tl.where(undefined, float("nan"), dense * tl.exp2((s - run_max) * exp2_scale))
                tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
            # The k entries overwrite what other threads of this program just wrote.
            tl.debug_barrier()
            top_grad = tl.where(undefined, float("nan"), step * (weights - c * q))
            tl.store(g_row + idx, top_grad.to(grad_ptr.dtype.element_ty), mask=kmask)
    else:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for block in range(0, num_blocks):
                offs = block * BLOCK + cols
                tl.store(g_row + offs, zeros, mask=offs < vocab)


@registry.triton_op("topk_kl_fwd")
def topk_kl_fwd(
    student: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    beta: float,
    scale: float,
    renormalize: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``slimlm::topk_kl_fwd_triton`` (CUDA, or CPU tensors when interpreted): the contract of
    ``reference.topk_kl_fwd``. Allocates the outputs and launches one program per row."""
    rows, vocab = student.shape
    k = logprobs.shape[1]
    loss = torch.empty(rows, dtype=torch.float32, device=student.device)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    if rows == 0:
        return loss, grad
    grad_out = gradient_buffer(grad, student, compute_grad)
    block = min(triton.next_power_of_2(vocab), 2048)
    num_warps = max(1, min(8, block // 256))
    kind = divergence_kind(beta)
    _topk_kl_fwd_kernel[(rows,)](
        student,
        logprobs,
        indices,
        labels if labels is not None else indices,
        loss,
        grad_out if compute_grad else student,
        vocab,
        k,
        ignore_index,
        1.0 / temperature,
        beta,
        math.log(beta) if kind == JSD.value else 0.0,
        math.log1p(-beta) if kind == JSD.value else 0.0,
        scale,
        DIVERGENCE=kind,
        RENORMALIZE=bool(renormalize),
        HAS_LABELS=labels is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK=block,
        BLOCK_K=max(16, triton.next_power_of_2(k)),
        num_warps=num_warps,
    )
    finish_gradient(grad, grad_out)
    return loss, grad
