"""Least-squares compensation of the projections that read pruned units.

When MLP neurons (attention heads) go, the projection they fed — ``down_proj`` (``o_proj``) —
still sums its remaining inputs with weights fitted for all of them. ``prune(..., reconstruct=
stats)`` refits the kept columns so that, on calibration tokens of the source model, the
projection's output moves as little as possible, without moving far from the weights it had
(per layer, a least squares regularised towards the original columns ``W_S``):

    V = argmin_V  Σ_tokens ||W a − V a_S||² + λ ||V − W_S||²
      ⇒  Vᵀ = (C_SS + λ I)⁻¹ (C_S: Wᵀ + λ W_Sᵀ)

with ``a`` the projection's input, ``S`` the kept inputs, ``C = Σ a aᵀ`` over the calibration
tokens and ``λ = ridge · mean(diag C_SS)``: ``ridge`` → ∞ is plain pruning, → 0 the full least
squares. On SmolLM2 cut to MLP 1536 → 384 and 25 layers, the full fit cut the zero-shot
perplexity the most (475 → 111) but after 82k tokens of distillation was behind plain pruning on
general text, and ridge 1 (475 → 200 zero-shot) ahead of it on both held-out sets (BENCHMARKS.md,
"Refitting what stays"), hence the default. Only ``C`` is
needed (``Σ a (W a)ᵀ = C Wᵀ``), so one calibration pass serves every later selection (the
search prunes many shapes from it). The fit is layer-local on the source model's activations:
a dropped layer or a pruned hidden channel upstream is not compensated.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from slimlm.architectures import get_adapter
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.calibration import batches, check_batch
from slimlm.surgery.slicing import head_rows

DEFAULT_RIDGE = 1.0


@dataclass
class ReconstructionStats:
    """Second moments of the inputs of every layer's ``o_proj`` and ``down_proj`` on a
    calibration set (``grams["o.3"]``, ``grams["down.3"]``: float64 sums of ``a aᵀ`` over
    ``tokens`` valid tokens), for the model with fingerprint ``source_fingerprint``; ``ridge``
    is the fit's relative regulariser. ``digest`` identifies the calibration tokens."""

    source_fingerprint: str
    grams: dict[str, torch.Tensor]
    tokens: int
    digest: str
    ridge: float = DEFAULT_RIDGE

    def check(self, model) -> None:
        """ValueError unless these statistics were taken on ``model`` and ``ridge`` is usable."""
        check_ridge(self.ridge)
        fingerprint = model_fingerprint(model)
        if fingerprint != self.source_fingerprint:
            raise ValueError("these reconstruction statistics were computed on another model "
                             f"(fingerprint {self.source_fingerprint}, this one {fingerprint})")

    def record(self) -> dict:
        """What a pruned model's record says of its compensation."""
        return {"tokens": self.tokens, "ridge": self.ridge, "calibration": self.digest}


def check_ridge(ridge) -> None:
    if not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool) and math.isfinite(ridge) and ridge > 0):
        raise ValueError(f"reconstruction ridge must be a finite number > 0, got {ridge!r}")


@torch.no_grad()
def reconstruction_stats(model, calibration, *, batch_size: int = 8, num_samples: int | None = None,
                         ridge: float = DEFAULT_RIDGE) -> ReconstructionStats:
    """One calibration pass over ``model`` (unchanged) that records, per decoder layer, the Gram
    matrix of the inputs of its attention output projection and its MLP down projection.

    ``calibration``: token ids as ``estimate_importance`` takes them (a ``TokenBlocks``, a
    (samples, seq) LongTensor, or an iterable of batch dicts); padding (``attention_mask`` 0)
    is left out. Memory: ``(num_heads·head_dim)² + intermediate_size²`` float64 numbers per
    layer (650 MB for SmolLM2-135M)."""
    adapter = get_adapter(model, "slimlm.surgery", "reconstructs")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    check_ridge(ridge)
    stats = ReconstructionStats(model_fingerprint(model), {}, 0, "", float(ridge))
    device = next(model.parameters()).device
    mask_now: list[torch.Tensor] = []

    def accumulate(name: str):
        def hook(module, inputs):
            x = inputs[0]
            rows = x[mask_now[0]].float()  # (valid tokens, features)
            gram = rows.T @ rows
            if name in stats.grams:
                stats.grams[name] += gram.double()
            else:
                stats.grams[name] = gram.double()
        return hook

    handles = []
    for index, layer in enumerate(adapter.layers(model)):
        handles.append(adapter.attention(layer).o.register_forward_pre_hook(accumulate(f"o.{index}")))
        handles.append(adapter.mlp(layer).down.register_forward_pre_hook(accumulate(f"down.{index}")))
    digest = hashlib.sha256()
    vocab = model.config.vocab_size
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(batches(calibration, batch_size, num_samples)):
            input_ids, mask = check_batch(batch, vocab, getattr(model.config, "max_position_embeddings", None), index)
            digest.update(input_ids.cpu().numpy().tobytes())
            mask = mask.to(device).bool()
            mask_now[:] = [mask]
            stats.tokens += int(mask.sum())
            model(input_ids=input_ids.to(device), attention_mask=mask.long(), use_cache=False,
                  logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if stats.tokens == 0:
        raise ValueError("the reconstruction's calibration data holds no token")
    stats.digest = digest.hexdigest()[:16]
    return stats


def refit_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """The regularised least-squares replacement of ``weight[:, keep]`` (module docstring), in
    ``weight``'s dtype: what the kept inputs should carry so that, on the tokens of ``gram``, the
    output stays closest to that of all inputs."""
    keep = keep.to(gram.device)
    full = weight.detach().to(gram.device, torch.float64)
    kept_gram = gram[keep][:, keep]
    damping = ridge * kept_gram.diagonal().mean().clamp_min(1e-12)
    kept_gram = kept_gram + damping * torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    cross = gram[keep] @ full.T + damping * full[:, keep].T  # (|S|, out)
    return torch.linalg.solve(kept_gram, cross).T.to(weight.device, weight.dtype)


@torch.no_grad()
def compensate_layer(attention_o, mlp_down, original_index: int, heads, neurons, head_dim: int,
                     stats: ReconstructionStats) -> None:
    """Refit, in place and before slicing, the kept input columns of one layer's ``o_proj`` (when
    ``heads`` go) and ``down_proj`` (when ``neurons`` go); the pruned columns are left as they are
    (slicing drops them)."""
    for linear, keep, name in ((attention_o, None if heads is None else head_rows(heads, head_dim), "o"),
                               (mlp_down, neurons, "down")):
        if keep is None:
            continue
        gram = stats.grams.get(f"{name}.{original_index}")
        if gram is None or gram.shape[0] != linear.weight.shape[1]:
            raise ValueError(f"reconstruction statistics have no {name} projection input of layer {original_index} "
                             f"with {linear.weight.shape[1]} features")
        linear.weight[:, keep.to(linear.weight.device)] = refit_columns(linear.weight, gram, keep, stats.ridge)
