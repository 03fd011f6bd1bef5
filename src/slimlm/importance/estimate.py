"""``estimate_importance``: one calibration pass with hooks → ``ImportanceScores``.

The pipeline of one call: check the options and the data (``calibration``), attach the hooks
(``hooks``) where the family's adapter (``slimlm.architectures``) says the modules are, run
the batches (rank r of a distributed run takes batches r, r + world, … and the sums are
all-reduced, so the scores equal one process's up to summation order), then turn the sums
into scores: ``activation`` (Minitron), ``wanda`` and ``magnitude`` (``weights``),
``block_influence`` and ``loss_drop`` (``depth``). What each metric measures is stated in
those modules. A KV group's score is the sum of its query heads' scores, for every metric
(``scores.kv_group_scores``), so a pruner can cut heads inside groups or whole groups.

Hidden channels are scored at the outputs of the two norms that feed the attention and MLP
blocks (``input_layernorm`` and the MLP's input norm: ``post_attention_layernorm`` in Llama,
``pre_feedforward_layernorm`` in Gemma), each norm scored on its own and the scores summed.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from slimlm.architectures import get_adapter, model_sizes
from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.activation import AGGREGATIONS, activation_scores
from slimlm.importance.calibration import batches, check_batch
from slimlm.importance.depth import DEPTH_METRICS, depth_scores
from slimlm.importance.hooks import Collector
from slimlm.importance.scores import ImportanceScores, kv_group_scores
from slimlm.importance.weights import weight_scores

WIDTH_METRICS = ("activation", "wanda", "magnitude")


def _check_options(metrics, depth, seq_agg, batch_agg, batch_size, num_samples) -> tuple[tuple, tuple]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics or ())
    depth = (depth,) if isinstance(depth, str) else tuple(depth or ())
    for name in metrics:
        if name not in WIDTH_METRICS:
            raise InputError(f"unknown width metric {name!r}; choose from {', '.join(WIDTH_METRICS)}")
    for name in depth:
        if name not in DEPTH_METRICS:
            raise InputError(f"unknown depth metric {name!r}; choose from {', '.join(DEPTH_METRICS)}")
    if not metrics and not depth:
        raise InputError("nothing to score: metrics and depth are both empty")
    for label, value in (("seq_agg", seq_agg), ("batch_agg", batch_agg)):
        if value not in AGGREGATIONS:
            raise ValueError(f"{label} must be one of {', '.join(AGGREGATIONS)}, got {value!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise ValueError(f"num_samples must be a positive integer or None, got {num_samples!r}")
    return metrics, depth


def estimate_importance(
    model,
    calibration,
    *,
    metrics=("activation",),
    depth=("block_influence", "loss_drop"),
    seq_agg: str = "mean",
    batch_agg: str = "l2",
    num_samples: int | None = None,
    batch_size: int = 8,
    device=None,
    progress: bool = True,
    loss_drop_samples: int | None = None,
    fingerprint: str | None = None,
) -> ImportanceScores:
    """Score every head, KV group, neuron, hidden channel (``metrics``) and layer (``depth``) of ``model``.

    ``calibration``: a (samples, seq) LongTensor of token ids (every token real), a
    ``slimlm.data.TokenBlocks``, or an iterable of dicts with ``input_ids`` and
    ``attention_mask`` (used as given; ``batch_size`` applies to tensors); it may be None
    when only ``magnitude`` is asked for (``depth=()``), which reads weights alone. ``num_samples``
    caps the samples used; ``loss_drop_samples`` caps, further, the samples that loss drop
    uses (the first ones; it costs about L/2 + vocab/(12·hidden) forward passes' worth of
    compute per sample, far more than the other scores). ``device``: where to run (default: the model's); the model is
    moved there for the call and back afterwards (leave it None for a model dispatched over
    several devices, which is used where it lies). ``fingerprint``: the model's
    ``model_fingerprint`` when the caller already has it (a run computes its teacher's once);
    computed here otherwise. Returns scores keyed ``"<metric>.<axis>"``
    (see the module docstring for the definitions) with ``meta`` recording the model's
    fingerprint, metrics, aggregations and counts.
    """
    metrics, depth = _check_options(metrics, depth, seq_agg, batch_agg, batch_size, num_samples)
    if loss_drop_samples is not None and (not isinstance(loss_drop_samples, int) or loss_drop_samples < 1):
        raise ValueError(f"loss_drop_samples must be a positive integer or None, got {loss_drop_samples!r}")
    adapter = get_adapter(model, "importance scoring", "scores")
    config = model.config
    sizes = model_sizes(config)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    data_metrics = [m for m in metrics if m != "magnitude"]
    needs_data = bool(data_metrics or depth)

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    collector = Collector(model, adapter, sizes, seq_agg, "activation" in metrics, "wanda" in metrics, depth, device)
    was_training = model.training
    move = device != home
    if needs_data:
        if move:
            model.to(device)
        model.eval()
        collector.attach()
        try:
            iterator = tqdm(batches(calibration, batch_size, num_samples), desc="importance", unit="batch",
                            disable=not progress or rank != 0)
            max_len = getattr(config, "max_position_embeddings", None)
            seen = 0  # samples of all ranks so far: the loss-drop subset is the same in every layout
            with torch.no_grad():
                for index, batch in enumerate(iterator):
                    input_ids, mask = check_batch(batch, config.vocab_size, max_len, index)
                    loss_rows = input_ids.shape[0]
                    if loss_drop_samples is not None:
                        loss_rows = max(0, min(loss_rows, loss_drop_samples - seen))
                    seen += input_ids.shape[0]
                    if index % world != rank:
                        continue
                    input_ids, mask = input_ids.to(device), mask.to(device)
                    collector.begin_batch(mask)
                    model(input_ids=input_ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
                    collector.end_batch(input_ids, loss_rows)
        finally:
            collector.detach()
            if move:
                model.to(home)
            model.train(was_training)
        if distributed:
            collector.all_reduce()
        if collector.sums["tokens"].item() == 0:
            raise InputError("the calibration data holds no real tokens (every attention_mask entry is 0)")
        if "loss_drop" in depth and collector.sums["pairs"].item() == 0:
            raise InputError("loss_drop needs samples with at least two real tokens")

    sums = {name: value.cpu() for name, value in collector.sums.items()}
    scores: dict[str, torch.Tensor] = {}
    for metric in metrics:
        if metric == "activation":
            per_axis = activation_scores(sums, sizes["num_layers"], batch_agg)
        else:
            per_axis = weight_scores(model, adapter, sizes, metric, sums)
        head = per_axis["head"].float()
        scores[f"{metric}.head"] = head
        scores[f"{metric}.kv_group"] = kv_group_scores(head, sizes["num_key_value_heads"])
        scores[f"{metric}.neuron"] = per_axis["neuron"].float()
        scores[f"{metric}.hidden"] = per_axis["hidden"].float()
    scores.update(depth_scores(sums, depth))

    meta = {
        "fingerprint": fingerprint or model_fingerprint(model),
        "model_name": getattr(config, "_name_or_path", "") or config.model_type,
        "model_type": config.model_type,
        "metrics": list(metrics),
        "depth": list(depth),
        "seq_agg": seq_agg,
        "batch_agg": batch_agg,
        "num_samples": int(sums["samples"].item()),
        "num_tokens": int(sums["tokens"].item()),
        "world_size": world,
    }
    if "loss_drop" in depth:
        meta["calibration_loss"] = float(sums["nll_full"] / sums["pairs"])
        meta["loss_drop_samples"] = int(sums["loss_samples"].item())
    if not math.isfinite(sum(float(t.sum()) for t in scores.values())):
        raise ValueError("importance scores are not finite: the model produced NaN/inf activations on the calibration data")
    return ImportanceScores(scores=scores, meta=meta)
