"""``kl_div_loss``: the dense distillation loss between materialised logits (one fused pass per row)."""
from __future__ import annotations

import torch

from slimlm.kernels.kl_div import KLDivFunction
from slimlm.losses.validation import check_labels, check_logits, check_options, valid_rows_and_norm


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
