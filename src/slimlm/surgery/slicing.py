"""The slicing primitives: replace a module's parameters by the kept rows/columns.

Each call allocates only the kept slice of one matrix and frees the old one, so a model is
pruned in place with at most one extra weight matrix alive at a time.
"""
from __future__ import annotations

import torch
from torch import nn


def _replace(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))


@torch.no_grad()
def slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output features ``rows`` (with their bias) and input features ``cols``."""
    weight = linear.weight
    if rows is not None and cols is not None:
        weight = weight[rows.to(weight.device)[:, None], cols.to(weight.device)]
    elif rows is not None:
        weight = weight.index_select(0, rows.to(weight.device))
    elif cols is not None:
        weight = weight.index_select(1, cols.to(weight.device))
    else:
        return
    _replace(linear, "weight", weight.contiguous())
    if rows is not None and linear.bias is not None:
        _replace(linear, "bias", linear.bias.index_select(0, rows.to(linear.bias.device)))
    linear.out_features, linear.in_features = weight.shape


@torch.no_grad()
def slice_norm(norm: nn.Module, keep: torch.Tensor, scale: float, offset: float) -> None:
    """Keep channels ``keep`` of a norm's weight (and bias) and multiply its effective gain
    ``offset + weight`` by ``scale``: w' = w·scale + offset·(scale − 1)."""
    weight = norm.weight.index_select(0, keep.to(norm.weight.device))
    if scale != 1.0:
        weight = weight * scale + offset * (scale - 1.0)
    _replace(norm, "weight", weight)
    if getattr(norm, "bias", None) is not None:
        _replace(norm, "bias", norm.bias.index_select(0, keep.to(norm.bias.device)))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (weight.shape[0],)


@torch.no_grad()
def slice_embedding(embedding: nn.Embedding, keep: torch.Tensor, scale: float) -> None:
    """Keep embedding channels ``keep``, times ``scale``."""
    weight = embedding.weight.index_select(1, keep.to(embedding.weight.device))
    if scale != 1.0:
        weight.mul_(scale)
    _replace(embedding, "weight", weight)
    embedding.embedding_dim = weight.shape[1]


def head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Row indices of whole heads in a projection laid out head after head."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
