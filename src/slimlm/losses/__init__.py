"""Distillation losses: one chunked base (``chunked``: the loop over row chunks of the LM head,
logits never materialised) and one file per family: ``kl_div`` (the teacher's whole
distribution, from logits or fused with the LM heads), ``topk`` (a sparse teacher, likewise),
``hidden_state`` (intermediate layers), ``causal_lm`` (Hugging Face glue); the shared checks
live in ``validation``. An LM head is one ``LMHead`` value (weight, bias, logit scale, soft-cap)
from ``slimlm.architectures.lm_head``.

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
from slimlm.architectures import LMHead
from slimlm.losses.causal_lm import causal_lm_kl_div_loss, last_hidden_state, lm_head_spec
from slimlm.losses.hidden_state import (
    HIDDEN_LOSS_KINDS,
    HiddenStateDistiller,
    HiddenStateProjection,
    depth_layer_map,
    hidden_state_loss,
)
from slimlm.losses.kl_div import FusedLinearKLDivLoss, fused_linear_kl_div_loss, kl_div_loss
from slimlm.losses.topk import TOPK_TAILS, fused_linear_topk_kl_div_loss, topk_kl_div_loss
from slimlm.losses.validation import REDUCTIONS, check_labels

__all__ = [
    "HIDDEN_LOSS_KINDS",
    "REDUCTIONS",
    "TOPK_TAILS",
    "FusedLinearKLDivLoss",
    "HiddenStateDistiller",
    "HiddenStateProjection",
    "LMHead",
    "causal_lm_kl_div_loss",
    "check_labels",
    "depth_layer_map",
    "fused_linear_kl_div_loss",
    "fused_linear_topk_kl_div_loss",
    "hidden_state_loss",
    "kl_div_loss",
    "last_hidden_state",
    "lm_head_spec",
    "topk_kl_div_loss",
]
