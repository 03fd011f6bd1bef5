"""The masked sequence-statistics op: backends, fake implementation, argument checks.

``masked_seq_stats(x, mask, group_size)`` turns (B, S, C) activations into per-sample
sums over the unmasked tokens — Σ v, Σ |v|, Σ v² for each channel (``group_size=1``) or
for the L2 norm of each group of ``group_size`` channels (heads of an attention output) —
from which importance scoring forms sequence means, L2 norms and variances, then batch
aggregates. Statistics are not differentiable: inputs are detached.
"""
from __future__ import annotations

import torch

from slimlm.kernels import reference, registry

# The C++ kernel reduces a group inside one 1024-element scratch chunk (csrc/cpu/masked_seq_stats.cpp).
_MAX_COMPILED_GROUP = 1024


def _fake(x, mask, group_size):
    return x.new_empty((3, x.shape[0], x.shape[2] // group_size), dtype=torch.float32)


OP = registry.declare("masked_seq_stats", reference=reference.masked_seq_stats, fake=_fake,
                      triton_module="slimlm.kernels.triton.masked_seq_stats",
                      reference_only=lambda x, mask, group_size: group_size > _MAX_COMPILED_GROUP)


def _check(x: torch.Tensor, mask: torch.Tensor | None, group_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (batch, seq, channels) tensor, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    if not isinstance(group_size, int) or group_size < 1 or x.shape[2] % group_size:
        raise ValueError(f"group_size must be a positive divisor of channels={x.shape[2]}, got {group_size!r}")
    if mask is not None:
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must have shape (batch, seq) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


def masked_seq_stats(
    x: torch.Tensor, mask: torch.Tensor | None = None, group_size: int = 1, backend: str | None = None
) -> torch.Tensor:
    """fp32 (3, B, C / group_size): Σ_s v, Σ_s |v|, Σ_s v² over tokens with ``mask[b, s]`` nonzero.

    v = x[b, s, j] (``group_size=1``) or ‖x[b, s, j·g : (j+1)·g]‖₂. ``mask`` is any (B, S)
    bool/integer tensor (1 = real token) or None (every token counts). fp64 input runs the
    reference and returns fp64. ``backend`` overrides the dispatcher (``slimlm.kernels.dispatch``).
    """
    _check(x, mask, group_size)
    x = x.detach().contiguous()
    if mask is not None:
        mask = mask.detach().to(torch.bool).contiguous()
    return OP(x, mask, group_size, backend=backend)
