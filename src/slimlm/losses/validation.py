"""Checks shared by every loss: each argument is checked once, here, and a user error is a
ValueError naming the argument and the sizes before any kernel runs."""
from __future__ import annotations

import math
import numbers

import torch

from slimlm.architectures import LMHead

REDUCTIONS = ("batchmean", "sum", "mean", "none")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-dim tensor")
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(tensor.shape)})")


def check_options(temperature, beta, reduction, num_items_in_batch) -> None:
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


def check_weights(ce_weight, kd_weight) -> None:
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def as_lm_head(side: str, weight, bias, logit_scale, softcap) -> LMHead:
    """One side's head as an ``LMHead``: ``weight`` is one already (then ``bias``, ``logit_scale``
    and ``softcap`` must be left at their defaults), or the (V, H) weight the others complete."""
    if isinstance(weight, LMHead):
        if bias is not None or logit_scale != 1.0 or softcap is not None:
            raise ValueError(f"{side}_weight is an LMHead: give its bias, logit scale and soft-cap in it, "
                             f"not as {side}_bias/{side}_logit_scale/{side}_softcap")
        return weight
    return LMHead(weight, bias, logit_scale, softcap)


def check_matrix(name: str, tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if dims and tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")


def _check_head_options(side: str, logit_scale, softcap) -> None:
    if not isinstance(logit_scale, numbers.Real) or not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"{side}_logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"{side}_softcap must be None or a finite number > 0, got {softcap!r}")


def check_head(side: str, hidden, head: LMHead) -> None:
    """One side's hidden (..., H) and LM head — weight (V, H), bias (V,), logit scale, soft-cap:
    shapes, dtypes, devices, values."""
    weight, bias = head.weight, head.bias
    check_matrix(f"{side}_hidden", hidden, 0)
    check_matrix(f"{side}_weight", weight, 2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden's last dimension ({hidden.shape[-1] if hidden.dim() else 'none'}) must equal "
            f"{side}_weight's hidden size ({weight.shape[1]}; weight shape {tuple(weight.shape)} is (vocab, hidden))"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight has an empty vocabulary dimension (shape {tuple(weight.shape)})")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}; they must match")
    if hidden.device != weight.device:
        raise ValueError(f"{side}_hidden is on {hidden.device} but {side}_weight on {weight.device}")
    if bias is not None:
        check_matrix(f"{side}_bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{side}_bias has {bias.shape[0]} entries but {side}_weight has {weight.shape[0]} vocabulary rows")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{side}_bias ({bias.dtype}, {bias.device}) must match {side}_weight ({weight.dtype}, {weight.device})")
    _check_head_options(side, head.logit_scale, head.softcap)


def check_ce_targets(flat_labels, ignore_index, vocab, ce_weight) -> None:
    if ce_weight == 0:
        return
    if flat_labels is None:
        raise ValueError("ce_weight > 0 needs labels (the next-token targets of each row)")
    # A range check needs the values on the host; free on CPU, a sync on CUDA where an
    # out-of-range target would instead trip the gather's device assertion.
    if flat_labels.device.type == "cpu" and not torch.compiler.is_compiling():
        targets = flat_labels[flat_labels != ignore_index]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(
                f"labels must lie in [0, {vocab}) (the vocabulary of the weights) or equal ignore_index "
                f"{ignore_index}; got values in [{int(targets.min())}, {int(targets.max())}]"
            )
