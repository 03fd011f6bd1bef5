"""The fused distillation-divergence op: backends, fake implementation, autograd.

``kl_div_fwd`` computes, in one pass per row, the loss and the student gradient.
The autograd function stores that gradient and its backward only scales it, in place,
so peak memory above the inputs is one gradient-sized buffer.
"""
from __future__ import annotations

import torch

from slimlm.kernels import reference, registry
from slimlm.kernels.precomputed_grad import save_and_reduce, scaled_saved_grad


def _fake(student, teacher, labels, ignore_index, temperature, beta, scale, compute_grad):
    return rows_and_grad_like(student, compute_grad)


def rows_and_grad_like(student: torch.Tensor, compute_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty outputs of a divergence op: fp32 loss rows (N,) and a student-shaped gradient (or empty)."""
    loss = student.new_empty(student.shape[0], dtype=torch.float32)
    grad = torch.empty_like(student) if compute_grad else student.new_empty(0)
    return loss, grad


OP = registry.declare("kl_div_fwd", reference=reference.kl_div_fwd, fake=_fake,
                      triton_module="slimlm.kernels.triton.kl_div")


def kl_div_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    scale: float = 1.0,
    compute_grad: bool = True,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss (fp32, (N,)) and student gradient ((N, V), student dtype) of 2-D contiguous logits.

    Inputs are assumed valid (``slimlm.losses.kl_div_loss`` checks them). ``backend``
    overrides the dispatcher's choice (see ``slimlm.kernels.dispatch``).
    """
    return OP(student, teacher, labels, int(ignore_index), float(temperature), float(beta), float(scale),
              bool(compute_grad), backend=backend)


class KLDivFunction(torch.autograd.Function):
    """loss = reduce(scale · divergence rows); the gradient comes from the forward pass.

    ``norm`` is the reduction's divisor as a 0-dim tensor (or None): dividing by it in
    backward instead of before the kernel avoids a host sync on the valid-row count.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, ignore_index, temperature, beta, scale, norm, reduce_rows, backend):
        loss_rows, grad = kl_div_fwd(
            student, teacher, labels, ignore_index, temperature, beta, scale, student.requires_grad, backend
        )
        return save_and_reduce(ctx, loss_rows, grad, norm, reduce_rows)

    @staticmethod
    def backward(ctx, grad_output):
        grad = scaled_saved_grad(ctx, grad_output, "kl_div_loss")
        return grad, None, None, None, None, None, None, None, None, None
