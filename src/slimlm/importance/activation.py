"""Activation statistics (Minitron): per-sample sequence aggregates, then the batch aggregate.

Per calibration sample b, over its real tokens s, a unit's value v is reduced over the
sequence, then over the samples:

    score = batch_agg_b( seq_agg_s( v_bs ) )
    seq_agg:   mean = Σ_s |v| / n_b      l2 = sqrt(Σ_s v²)      var = Σ_s v² / n_b − (Σ_s v / n_b)²
    batch_agg: mean = Σ_b a_b / N        l2 = sqrt(Σ_b a_b²)    var = Σ_b a_b² / N − (Σ_b a_b / N)²

(N: samples with at least one real token.) The hooks keep Σ_b a_b and Σ_b a_b² per unit.
"""
from __future__ import annotations

import torch

AGGREGATIONS = ("mean", "l2", "var")


def sequence_aggregate(stats: torch.Tensor, counts: torch.Tensor, how: str) -> torch.Tensor:
    """(B, G) per-sample aggregate from ``masked_seq_stats`` output (3, B, G) and real-token counts (B,).

    Samples without real tokens get 0 (their sums are 0), and are left out of the sample count.
    """
    n = counts.clamp_min(1).to(stats.dtype).unsqueeze(1)
    if how == "mean":
        return stats[1] / n
    if how == "l2":
        return stats[2].sqrt()
    mean = stats[0] / n
    return (stats[2] / n - mean.square()).clamp_min(0)


def batch_aggregate(first: torch.Tensor, second: torch.Tensor, samples: torch.Tensor, how: str) -> torch.Tensor:
    """Batch aggregate from Σ_b a_b, Σ_b a_b² and the sample count."""
    if how == "l2":
        return second.sqrt()
    mean = first / samples
    if how == "mean":
        return mean
    return (second / samples - mean.square()).clamp_min(0)


def activation_scores(sums: dict[str, torch.Tensor], num_layers: int, batch_agg: str) -> dict[str, torch.Tensor]:
    """head (L, heads), neuron (L, intermediate) and hidden (hidden,) scores from the hooks' sums:
    a hidden channel's score is the sum over both block-input norms of every layer."""
    samples = sums["samples"]

    def aggregate(name: str) -> torch.Tensor:
        return batch_aggregate(sums[name + ".first"], sums[name + ".second"], samples, batch_agg)

    return {
        "head": torch.stack([aggregate(f"head.{i}") for i in range(num_layers)]),
        "neuron": torch.stack([aggregate(f"neuron.{i}") for i in range(num_layers)]),
        "hidden": sum(aggregate(f"attn_norm.{i}") + aggregate(f"mlp_norm.{i}") for i in range(num_layers)),
    }
