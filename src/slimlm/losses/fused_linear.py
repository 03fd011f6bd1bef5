"""``fused_linear_kl_div_loss``: the distillation loss from hidden states and LM heads, never (N, V).

Logits are formed per row chunk through ``slimlm.kernels.fused_linear``; each side's head
is an ``LMHead`` (weight, bias, logit scale, soft-cap). ``run_fused`` wires any per-chunk
loss through the fused autograd function; the top-k loss's fused form uses it too.
"""
from __future__ import annotations

import dataclasses

import torch

from slimlm.architectures import LMHead
from slimlm.kernels import fused_linear, kl_div
from slimlm.losses.validation import (
    as_lm_head,
    check_ce_targets,
    check_chunk_size,
    check_head,
    check_labels,
    check_options,
    check_weights,
    valid_rows_and_norm,
)


def fused_linear_kl_div_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor | LMHead,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_temperature_sq: bool = True,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    drop_ignored_rows: bool | None = None,
    backend: str | None = None,
    gemm_dtype: torch.dtype | None = None,
    return_terms: bool = False,
) -> torch.Tensor | dict:
    """``kl_div_loss`` of logits that are never materialised, plus optional next-token CE.

    With s = softcap((student_hidden @ student_weightᵀ + student_bias) · student_logit_scale)
    and t likewise for the teacher (softcap(z) = cap · tanh(z / cap); None: no cap), each valid
    row contributes  kd_weight · τ² · D(P‖Q) + ce_weight · (logsumexp(s) − s[label])
    (D, τ, β and the τ² switch as in ``kl_div_loss``; CE at temperature 1 on the capped logits).
    Reductions: ``batchmean`` and ``mean`` divide by the valid-row count (or ``num_items_in_batch``);
    ``mean`` also divides the KD term by V, as ``kl_div_loss`` does, but not the CE term (the
    usual CE mean); ``sum`` adds; ``none`` returns the per-row total (leading shape).

    The hidden states are (..., H_s) and (..., H_t) with the same leading shape (the teacher's
    width may differ); weights are (V, H), or each side's whole ``LMHead`` (weight, bias, logit
    scale and soft-cap in one value, as ``slimlm.architectures.lm_head`` gives it). Logits are formed in row chunks of ``chunk_size``
    rows (None: picked from a memory budget), in fp32 whatever the input dtype; the gradients
    of student_hidden, student_weight and student_bias are computed during the forward (the
    weight's and bias's accumulated in fp32) and only scaled by backward, so call backward
    once per forward. The teacher gets no gradient. ``backend`` picks the per-chunk KL kernel.
    ``gemm_dtype``: operand dtype of the head GEMMs (both heads, forward and gradients);
    None follows autocast when it is on at the call (bf16 under a bf16 autocast), else keeps
    them exact. Ambient autocast never changes them otherwise; softmax and KL stay fp32.
    ``return_terms=True`` returns ``{"loss": total, "kd": KD, "ce": CE}``: the unweighted terms,
    reduced like the total and detached (for logging), "kd" only when kd_weight > 0 and "ce"
    only when ce_weight > 0.
    """
    student_head = as_lm_head("student", student_weight, student_bias, student_logit_scale, student_softcap)
    teacher_head = as_lm_head("teacher", teacher_weight, teacher_bias, teacher_logit_scale, teacher_softcap)
    check_head("student", student_hidden, student_head)
    check_head("teacher", teacher_hidden, teacher_head)
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student_weight has {student_head.weight.shape[0]} rows, teacher_weight "
            f"{teacher_head.weight.shape[0]} (pad the smaller with -inf logits or trim when only padding differs)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) shape"
        )
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but teacher_hidden on {teacher_hidden.device}")
    check_options(temperature, beta, reduction, num_items_in_batch)
    check_weights(ce_weight, kd_weight)
    check_chunk_size(chunk_size)
    leading = student_hidden.shape[:-1]
    check_labels(labels, leading, student_hidden.device)

    vocab = student_head.weight.shape[0]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    check_ce_targets(flat_labels, ignore_index, vocab, ce_weight)
    rows, host_norm, norm = valid_rows_and_norm(
        flat_labels, hidden.shape[0], ignore_index, reduction, num_items_in_batch, hidden.device, drop_ignored_rows
    )
    kd_scale = kd_weight * (float(temperature) ** 2 if scale_by_temperature_sq else 1.0) / host_norm
    if reduction == "mean":
        kd_scale /= vocab
    ce_scale = ce_weight / host_norm
    gemm_dtype = fused_linear.resolve_gemm_dtype(gemm_dtype, hidden.device)
    teacher_linear = linear_head(teacher_head, gemm_dtype)
    # With dropped rows every chunk row is valid; otherwise the kernel masks by label.
    pass_labels = flat_labels if rows is None else None
    term_rows = {}
    if return_terms:
        for name, weight in (("kd", kd_weight), ("ce", ce_weight)):
            if weight:
                term_rows[name] = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)

    def keep_term(name, index, values, weight):
        if name in term_rows:
            if isinstance(index, slice):
                term_rows[name][index] = values.detach() / weight
            else:
                term_rows[name].index_copy_(0, index, values.detach().float() / weight)

    def chunk_loss(student_logits, index, compute_grad):
        teacher_chunk = teacher_rows[index] if isinstance(index, slice) else teacher_rows.index_select(0, index)
        teacher_logits = teacher_linear.logits(teacher_linear.operand(teacher_chunk)).to(student_logits.dtype)
        chunk_labels = pass_labels[index] if pass_labels is not None else None
        if kd_scale != 0:
            loss_rows, dlogits = kl_div.kl_div_fwd(
                student_logits, teacher_logits, chunk_labels, ignore_index, float(temperature), float(beta),
                kd_scale, compute_grad, backend,
            )
        else:
            loss_rows = student_logits.new_zeros(student_logits.shape[0])
            dlogits = torch.zeros_like(student_logits) if compute_grad else None
        del teacher_logits
        dlogits = dlogits if compute_grad else None
        keep_term("kd", index, loss_rows, kd_weight)
        if ce_weight:
            targets = flat_labels[index] if isinstance(index, slice) else flat_labels.index_select(0, index)
            valid = (targets != ignore_index) if rows is None else None
            ce_rows = fused_linear.cross_entropy_into(student_logits, targets, valid, ce_scale, dlogits)
            keep_term("ce", index, ce_rows, ce_weight)
            loss_rows = loss_rows + ce_rows
        return loss_rows, dlogits

    loss = run_fused(hidden, student_head, chunk_loss, rows, chunk_size, norm, reduction, leading, gemm_dtype)
    if not return_terms:
        return loss
    terms = {"loss": loss}
    for name, values in term_rows.items():
        if reduction == "none":
            terms[name] = values.reshape(leading)
        else:
            total = values.sum()
            terms[name] = total / norm if norm is not None else total
    return terms


def linear_head(head: LMHead, gemm_dtype: torch.dtype | None) -> fused_linear.LinearHead:
    """The kernels' compute form of a (detached) ``LMHead``, its GEMMs in ``gemm_dtype``."""
    head = head.detached()
    return fused_linear.LinearHead(head.weight, head.bias, float(head.logit_scale), head.softcap, gemm_dtype)


def run_fused(hidden, head: LMHead, chunk_loss, rows, chunk_size, norm, reduction, leading, gemm_dtype=None):
    """Wires a chunk loss through ``FusedLinearLossFunction`` for the student side.

    ``gemm_dtype`` is already resolved (``fused_linear.resolve_gemm_dtype``): autocast is off
    inside, so the GEMMs run exactly in the precision chosen here, in forward and backward.
    """

    def run(hidden_, weight_, bias_, need_hidden, need_weight, need_bias, row_weights):
        with torch.autocast(hidden_.device.type, enabled=False):
            return fused_linear.chunked_linear_loss(
                hidden_.detach(), linear_head(dataclasses.replace(head, weight=weight_, bias=bias_), gemm_dtype),
                chunk_loss, rows=rows, chunk_size=chunk_size, need_grad_hidden=need_hidden,
                need_grad_weight=need_weight, need_grad_bias=need_bias, row_weights=row_weights,
            )

    weight, bias = head.weight, head.bias
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants_grad:
        loss = fused_linear.FusedLinearLossFunction.apply(hidden, weight, bias, run, norm, reduction != "none")
    else:
        # No graph (no_grad, evaluation): the loss alone, without the gradient work of the forward.
        loss = run(hidden, weight, bias, False, False, False, None).loss_rows
        if reduction != "none":
            loss = loss.sum() / norm if norm is not None else loss.sum()
    return loss.reshape(leading) if reduction == "none" else loss


class FusedLinearKLDivLoss(torch.nn.Module):
    """Module form of ``fused_linear_kl_div_loss``: options at construction, tensors per call."""

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - _FUSED_OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(_FUSED_OPTIONS)}")
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                teacher_bias=None, labels=None, num_items_in_batch=None):
        return fused_linear_kl_div_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, labels=labels, num_items_in_batch=num_items_in_batch, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in sorted(self.options.items()))


_FUSED_OPTIONS = {
    "ignore_index", "temperature", "beta", "reduction", "chunk_size", "ce_weight", "kd_weight",
    "scale_by_temperature_sq", "student_logit_scale", "teacher_logit_scale", "student_softcap",
    "teacher_softcap", "drop_ignored_rows", "backend", "gemm_dtype", "return_terms",
}
