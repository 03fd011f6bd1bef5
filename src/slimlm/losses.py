"""Distillation losses.

Conventions (shared by every loss here):
- P = softmax(teacher / τ), Q = softmax(student / τ), M = βP + (1−β)Q.
- β = 0: forward KL(P‖Q) (Minitron's default); β = 1: reverse KL(Q‖P);
  0 < β < 1: generalised JSD β·KL(P‖M) + (1−β)·KL(Q‖M). This is the TRL/Liger
  convention; note that β → 0 of the JSD is 0, not forward KL, so the endpoints are
  the two KL directions by definition.
- ``scale_by_temperature_sq=True`` multiplies the loss by τ² (Hinton), so gradient
  magnitudes do not shrink as τ grows.
- Rows whose label is ``ignore_index`` count for nothing. ``batchmean`` divides by
  the number of valid rows, or by ``num_items_in_batch`` when given (use the global
  count under gradient accumulation or data parallelism); ``mean`` divides by valid
  rows × vocabulary; ``sum`` adds; ``none`` returns one loss per row (leading shape).
- Losses are returned in fp32 whatever the input dtype.
"""
from __future__ import annotations

import math
import numbers

import torch

from slimlm.kernels.kl_div import KLDivFunction

REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_logits(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-dim tensor")
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(tensor.shape)})")


def _check_options(temperature, beta, reduction, num_items_in_batch) -> None:
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if num_items_in_batch is not None:
        count = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
        if count <= 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {count}")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"num_items_in_batch only applies to reduction='batchmean' or 'mean', got {reduction!r}")


def check_labels(labels, leading_shape: torch.Size, device: torch.device) -> None:
    """Labels must be an integer tensor with the logits' leading shape, on their device."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")


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
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
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
    _check_options(temperature, beta, reduction, num_items_in_batch)
    leading = student_logits.shape[:-1]
    check_labels(labels, leading, student_logits.device)

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.detach().reshape(-1, vocab).to(student.dtype).contiguous()
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    scale = float(temperature) ** 2 if scale_by_temperature_sq else 1.0

    norm = None
    if reduction in ("batchmean", "mean"):
        if num_items_in_batch is not None:
            count = num_items_in_batch
        elif flat_labels is not None:
            count = (flat_labels != ignore_index).sum()
        else:
            count = student.shape[0]
        per_row = vocab if reduction == "mean" else 1
        if student.device.type == "cpu":
            # No device sync on CPU: fold the divisor into the kernel's scale.
            scale /= max(float(count), 1.0) * per_row
        else:
            count = torch.as_tensor(count, device=student.device, dtype=torch.float32)
            norm = count.clamp(min=1.0) * per_row

    loss = KLDivFunction.apply(
        student, teacher, flat_labels, ignore_index, float(temperature), float(beta), scale, norm,
        reduction != "none", None,
    )
    return loss.reshape(leading) if reduction == "none" else loss
