"""The sparse-teacher divergence op: backends, fake implementation, autograd.

``topk_kl_fwd`` computes, per row of student logits, the divergence against a teacher given
only as its top-k log-probabilities and their vocabulary indices, and the student gradient,
in two passes over the row: (1) max and log-sum-exp over the full vocabulary, (2) a dense
write of the gradient's softmax part followed by a scatter at the k indices. The k-sized
bookkeeping in between (tail bucket, divergence, per-index weights) is identical in every
backend and written out in ``reference.topk_kl_fwd``'s terms:

    q_i = exp(s[idx_i]/τ − lse), p_i = exp(lp_i);   w_i = q_i · ∂D/∂q_i (through the tail),
    c = Σ_i w_i;   grad_u = scale/τ · (w_u − c · q_u)   with w_u = 0 off the top-k.
"""
from __future__ import annotations

import torch

from slimlm.kernels import reference, registry
from slimlm.kernels.kl_div import rows_and_grad_like
from slimlm.kernels.precomputed_grad import save_and_reduce, scaled_saved_grad


def _fake(student, logprobs, indices, labels, ignore_index, temperature, beta, scale, renormalize, compute_grad):
    return rows_and_grad_like(student, compute_grad)


OP = registry.declare("topk_kl_fwd", reference=reference.topk_kl_fwd, fake=_fake,
                      triton_module="slimlm.kernels.triton.topk_kl")


def topk_kl_fwd(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    scale: float = 1.0,
    renormalize: bool = False,
    compute_grad: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32, (N,)) and student gradient ((N, V), student dtype).

    Inputs are assumed valid and laid out for the kernels (``slimlm.losses.topk_kl_div_loss``
    checks them): student (N, V) contiguous, log-probs (N, k) fp32, indices (N, k) int64 in
    [0, V) and distinct per row, labels (N,) int64 or None.
    """
    return OP(student, topk_logprobs, topk_indices, labels, int(ignore_index), float(temperature), float(beta),
              float(scale), bool(renormalize), bool(compute_grad), backend=backend)


class TopKKLFunction(torch.autograd.Function):
    """loss = reduce(scale · sparse-teacher divergence rows); the gradient comes from the forward.

    ``norm``: the reduction's divisor as a 0-dim tensor (or None when folded into ``scale``).
    """

    @staticmethod
    def forward(ctx, student, logprobs, indices, labels, ignore_index, temperature, beta, scale, renormalize, norm,
                reduce_rows, backend):
        loss_rows, grad = topk_kl_fwd(student, logprobs, indices, labels, ignore_index, temperature, beta, scale,
                                      renormalize, student.requires_grad, backend)
        return save_and_reduce(ctx, loss_rows, grad, norm, reduce_rows)

    @staticmethod
    def backward(ctx, grad_output):
        grad = scaled_saved_grad(ctx, grad_output, "topk_kl_div_loss")
        return grad, None, None, None, None, None, None, None, None, None, None, None
