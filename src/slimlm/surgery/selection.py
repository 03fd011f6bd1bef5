"""Which units stay: top-scoring indices per axis, chosen before any weight is touched."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.errors import InputError
from slimlm.importance.scores import ImportanceScores, kv_group_scores


@dataclass
class Selection:
    """Kept units, as sorted index tensors into the original model (None: all kept).

    ``heads[l]`` / ``kv_heads[l]`` / ``neurons[l]`` are keyed by the original index of a kept
    layer; query heads are listed group by group (``importance.scores.kv_group_scores``' rule),
    so kept query head i belongs to kept KV head i // (heads per group)."""

    kept_layers: list[int]
    hidden: torch.Tensor | None
    heads: dict[int, torch.Tensor] | None
    kv_heads: dict[int, torch.Tensor] | None
    neurons: dict[int, torch.Tensor] | None


def top_sorted(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Indices of the k highest scores along ``dim``, in ascending index order (so kept
    units keep their relative order)."""
    return scores.topk(k, dim=dim).indices.sort(dim=dim).values


def _scores_for(scores: ImportanceScores | None, axis: str, shape: tuple, why: str) -> torch.Tensor:
    if scores is None:
        raise InputError(f"{why} needs importance scores (axis {axis!r}); got scores=None")
    if not scores.has(axis):
        have = ", ".join(scores.scores) or "none"
        raise InputError(f"{why} needs scores for axis {axis!r}; these scores have {have}")
    values = scores.get(axis)
    if tuple(values.shape) != shape:
        raise InputError(f"{axis!r} scores have shape {tuple(values.shape)}, this model needs {shape}")
    values = values.detach().float().cpu()
    if not torch.isfinite(values).all():
        raise InputError(f"{axis!r} scores contain NaN or infinite values")
    return values


def kept_layers_for(scores: ImportanceScores | None, num_layers: int, keep: int,
                    depth_selection: str = "least_important") -> list[int]:
    """Original indices of the ``keep`` layers of ``num_layers`` that stay: the highest-scoring
    ones (``least_important`` go), or all but the contiguous block of ``num_layers - keep``
    with the lowest summed score (``contiguous_block``)."""
    if keep == num_layers:
        return list(range(num_layers))
    layer_scores = _scores_for(scores, "layer", (num_layers,), f"num_layers={keep}")
    if depth_selection == "contiguous_block":
        dropped = ImportanceScores({"depth.layer": layer_scores}).best_contiguous_block(num_layers - keep)
        return [i for i in range(num_layers) if i not in dropped]
    return top_sorted(layer_scores, keep).tolist()


def select_units(scores: ImportanceScores | None, before: dict, after: dict,
                 drop_layers: list[int] | None, depth_selection: str = "least_important") -> Selection:
    """Apply a plan's sizes to the scores: which layers, channels, heads and neurons stay
    (layers by ``drop_layers`` when given, else by ``kept_layers_for``)."""
    num_layers = before["num_layers"]
    if drop_layers is not None and after["num_layers"] < num_layers:
        kept_layers = [i for i in range(num_layers) if i not in set(drop_layers)]
    else:
        kept_layers = kept_layers_for(scores, num_layers, after["num_layers"], depth_selection)

    hidden = None
    if after["hidden_size"] < before["hidden_size"]:
        hidden_scores = _scores_for(scores, "hidden", (before["hidden_size"],), f"hidden_size={after['hidden_size']}")
        hidden = top_sorted(hidden_scores, after["hidden_size"])

    neurons = None
    if after["intermediate_size"] < before["intermediate_size"]:
        neuron_scores = _scores_for(scores, "neuron", (num_layers, before["intermediate_size"]),
                                    f"intermediate_size={after['intermediate_size']}")
        neurons = {layer: top_sorted(neuron_scores[layer], after["intermediate_size"]) for layer in kept_layers}

    heads = kv_heads = None
    heads_before, kv_before = before["num_attention_heads"], before["num_key_value_heads"]
    heads_after, kv_after = after["num_attention_heads"], after["num_key_value_heads"]
    if (heads_after, kv_after) != (heads_before, kv_before):
        why = f"num_attention_heads={heads_after}, num_key_value_heads={kv_after}"
        group_before, group_after = heads_before // kv_before, heads_after // kv_after
        head_scores = None
        if group_after < group_before or scores is None or not scores.has("kv_group"):
            head_scores = _scores_for(scores, "head", (num_layers, heads_before), why)
        if kv_after < kv_before and scores.has("kv_group"):
            group_scores = _scores_for(scores, "kv_group", (num_layers, kv_before), why)
        else:
            group_scores = kv_group_scores(head_scores, kv_before)
        heads, kv_heads = {}, {}
        for layer in kept_layers:
            groups = top_sorted(group_scores[layer], kv_after)
            if head_scores is None:  # whole groups go, each kept group keeps all its heads
                inside = torch.arange(group_before).expand(kv_after, group_before)
            else:
                inside = top_sorted(head_scores[layer].view(kv_before, group_before)[groups], group_after, dim=1)
            heads[layer] = (groups[:, None] * group_before + inside).flatten()
            kv_heads[layer] = groups
    return Selection(kept_layers, hidden, heads, kv_heads, neurons)
