"""Autograd plumbing shared by the fused losses whose gradient is computed in the forward pass.

The kernel returns per-row losses and d(sum of rows)/d input. The loss is reduced here and the
gradient saved; backward only scales that saved gradient, in place, so peak memory above the
inputs stays one gradient-sized buffer. The price: backward may run once per forward.
"""
from __future__ import annotations

import torch


def save_and_reduce(ctx, loss_rows: torch.Tensor, grad: torch.Tensor, norm: torch.Tensor | None, reduce_rows: bool):
    """Saves ``grad`` for ``scaled_saved_grad`` and returns the loss: the rows' sum divided by
    ``norm`` (a 0-dim tensor, or None for no division), or the rows themselves."""
    ctx.reduce_rows = reduce_rows
    ctx.consumed = False
    ctx.save_for_backward(grad, norm if norm is not None else torch.ones((), device=grad.device))
    if not reduce_rows:
        return loss_rows
    loss = loss_rows.sum()
    return loss / norm if norm is not None else loss


def scaled_saved_grad(ctx, grad_output: torch.Tensor, op_name: str) -> torch.Tensor:
    """The saved gradient times grad_output (per row for unreduced losses), scaled in place."""
    grad, norm = ctx.saved_tensors
    if ctx.consumed:
        raise RuntimeError(
            f"{op_name}: backward ran twice through the same graph; its gradient is computed in "
            "the forward pass and scaled in place, so recompute the loss instead of retain_graph=True"
        )
    ctx.consumed = True
    factor = grad_output / norm if ctx.reduce_rows else grad_output.reshape(-1, 1)
    # On CPU the check is free and the common factor 1 saves a pass over (N, V);
    # a compiled graph cannot branch on a tensor's value, so it always scales.
    if grad.device.type != "cpu" or torch.compiler.is_compiling() or not bool((factor == 1).all()):
        grad.mul_(factor.to(grad.dtype))
    return grad
