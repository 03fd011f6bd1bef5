"""Distillation from the teacher's whole distribution: ``kl_div_loss`` between materialised
logits (one fused pass per row) and ``fused_linear_kl_div_loss`` from hidden states and LM
heads, whose logits are never materialised (a chunk function on ``slimlm.losses.chunked``)."""
from __future__ import annotations

import torch

from slimlm.architectures import LMHead
from slimlm.kernels.kl_div import KLDivFunction, kl_div_fwd
from slimlm.losses.chunked import chunked_head_loss, valid_rows_and_norm
from slimlm.losses.validation import (
    as_lm_head,
    check_chunk_size,
    check_head,
    check_labels,
    check_logits,
    check_options,
    check_weights,
)


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    scale_by_temperature_sq: bool = True,
) -> torch.Tensor:
    """Fused distillation loss between student and teacher logits of shape (..., V).

    loss_row = τ² · D(P‖Q) with D the forward KL, reverse KL or JSD(β) (module docstring),
    reduced over valid rows. One fused pass per row computes the loss and the student
    gradient (stored in the student's dtype); backward only scales it, so call backward
    once per forward. The teacher gets no gradient. Teacher logits in another float dtype
    are cast to the student's.
    """
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        detail = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            detail = f": vocabulary sizes differ (student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]})"
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            f"must have the same shape{detail}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits are on {student_logits.device} but teacher_logits on {teacher_logits.device}")
    check_options(temperature, beta, reduction, num_items_in_batch)
    leading = student_logits.shape[:-1]
    check_labels(labels, leading, student_logits.device)

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.detach().reshape(-1, vocab).to(student.dtype).contiguous()
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    scale = float(temperature) ** 2 if scale_by_temperature_sq else 1.0

    _, host_norm, norm = valid_rows_and_norm(
        flat_labels, student.shape[0], ignore_index, reduction, num_items_in_batch, student.device, False
    )
    per_row = vocab if reduction == "mean" else 1
    scale /= host_norm * (per_row if norm is None else 1)
    if norm is not None:
        norm = norm * per_row

    loss = KLDivFunction.apply(
        student, teacher, flat_labels, ignore_index, float(temperature), float(beta), scale, norm,
        reduction != "none", None,
    )
    return loss.reshape(leading) if reduction == "none" else loss


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
    check_labels(labels, student_hidden.shape[:-1], student_hidden.device)

    def soft_loss(student_logits, teacher, chunk_labels, scale, compute_grad):
        (teacher_logits,) = teacher
        return kl_div_fwd(student_logits, teacher_logits, chunk_labels, ignore_index, float(temperature), float(beta),
                          scale, compute_grad, backend)

    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    return chunked_head_loss(
        student_hidden, student_head, soft_loss, (teacher_rows,), teacher_head=teacher_head, labels=labels,
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, num_items_in_batch=num_items_in_batch,
        scale_by_temperature_sq=scale_by_temperature_sq, chunk_size=chunk_size, ce_weight=ce_weight,
        kd_weight=kd_weight, drop_ignored_rows=drop_ignored_rows, gemm_dtype=gemm_dtype, return_terms=return_terms,
    )


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
