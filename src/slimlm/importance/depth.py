"""Depth metrics: block influence and loss drop, per decoder layer.

``block_influence`` = 1 − mean over real tokens of cos(layer input, layer output) (ShortGPT).
``loss_drop`` = calibration LM loss (mean NLL over real next-token pairs) with the layer
skipped, minus the full model's. It reruns only the layers after the skipped one, from the
cached input of the skipped layer: Σ_i (L − 1 − i) = L(L−1)/2 layer calls per batch (about
L/2 passes' worth) instead of L full passes, holding L hidden states.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.architectures import LMHead

DEPTH_METRICS = ("block_influence", "loss_drop")


def first_rows(value, batch: int, rows: int):
    """``value`` (a layer call's argument) cut to its first ``rows`` samples: tensors whose
    leading dimension is the batch are sliced, containers recursively, the rest kept."""
    if rows == batch:
        return value
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(first_rows(item, batch, rows) for item in value)
    if isinstance(value, list):
        return [first_rows(item, batch, rows) for item in value]
    if isinstance(value, dict):
        return {key: first_rows(item, batch, rows) for key, item in value.items()}
    return value


def nll_sum(final_norm: nn.Module, head: LMHead, hidden: torch.Tensor, input_ids: torch.Tensor,
            pair: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL over pairs of real tokens, one sample at a time (bounds the logits' memory)."""
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    normed = final_norm(hidden)
    for b in range(hidden.shape[0]):
        nll = F.cross_entropy(head.logits(normed[b, :-1]), input_ids[b, 1:], reduction="none")
        total += torch.where(pair[b], nll, 0.0).sum(dtype=torch.float64)
    return total


def add_loss_drop(sums: dict[str, torch.Tensor], layers: nn.ModuleList, final_norm: nn.Module, head: LMHead,
                  layer_inputs: list, layer_kwargs: list, final_hidden: torch.Tensor, input_ids: torch.Tensor,
                  mask: torch.Tensor, rows: int) -> None:
    """Add one batch's full and layer-skipped NLL sums (its first ``rows`` samples) to ``sums``,
    from each layer's cached input and call arguments."""
    batch = input_ids.shape[0]
    input_ids, mask = input_ids[:rows], mask[:rows]
    pair = mask[:, :-1] & mask[:, 1:]
    sums["loss_samples"] += rows
    sums["pairs"] += pair.sum()
    sums["nll_full"] += nll_sum(final_norm, head, final_hidden[:rows], input_ids, pair)
    for i in range(len(layers)):
        hidden = layer_inputs[i][:rows]
        for j in range(i + 1, len(layers)):
            args, kwargs = layer_kwargs[j]
            hidden = layers[j](hidden, *first_rows(args, batch, rows), **first_rows(kwargs, batch, rows))
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        sums["nll_skip"][i] += nll_sum(final_norm, head, hidden, input_ids, pair)


def depth_scores(sums: dict[str, torch.Tensor], depth: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``<metric>.layer`` scores from the summed cosines and NLLs."""
    scores = {}
    if "block_influence" in depth:
        scores["block_influence.layer"] = (1.0 - sums["cosine"] / sums["tokens"]).float()
    if "loss_drop" in depth:
        full = sums["nll_full"] / sums["pairs"]
        scores["loss_drop.layer"] = (sums["nll_skip"] / sums["pairs"] - full).float()
    return scores
