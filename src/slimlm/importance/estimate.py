"""``estimate_importance``: one calibration pass with hooks → ``ImportanceScores``.

Width, activation-based (Minitron). Per calibration sample b, over its real tokens s
(the attention mask decides; padding never counts), a unit's value v is reduced over the
sequence, then over the samples:

    score = batch_agg_b( seq_agg_s( v_bs ) )
    seq_agg:   mean = Σ_s |v| / n_b      l2 = sqrt(Σ_s v²)      var = Σ_s v² / n_b − (Σ_s v / n_b)²
    batch_agg: mean = Σ_b a_b / N        l2 = sqrt(Σ_b a_b²)    var = Σ_b a_b² / N − (Σ_b a_b / N)²

(N: samples with at least one real token.) The default mean/l2 is Minitron's published best.
v is: for a head, the L2 norm of its slice of the input to ``o_proj``; for a neuron, its
channel of the input to ``down_proj``; for a hidden channel, its channel of the output of
each norm that feeds a block (two per layer), each norm scored on its own and the scores
summed over all of them. A KV group's score is the sum of its query heads' scores (for
every metric), so a pruner can cut heads inside groups or whole groups.

Width, weight-based: ``magnitude`` = L2 norm of the weights a unit owns (data-free);
``wanda`` = Σ over those weights of |W_ij|·‖X_j‖₂, ‖X_j‖₂ over all real calibration tokens
of the weight's input channel j. A head owns its q rows and o columns, a neuron its gate
and up rows and down column, a hidden channel its column of every q/k/v/gate/up weight and
its row of every o/down weight (plus, for magnitude, norm weights and embeddings).

Depth: ``block_influence`` = 1 − mean over real tokens of cos(layer input, layer output);
``loss_drop`` = calibration LM loss (mean NLL over real next-token pairs) with the layer
skipped, minus the full model's. Loss drop reruns only the layers after the skipped one,
from the cached input of the skipped layer: Σ_i (L − 1 − i) = L(L−1)/2 layer calls per
batch (about L/2 passes' worth) instead of L full passes, holding L hidden states.

Distributed: with ``torch.distributed`` initialised, every rank passes the same calibration
data, rank r processes batches r, r + world, …, and all sums are all-reduced, so the scores
equal one process's up to summation order.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.importance.layout import ModelLayout, model_layout
from slimlm.importance.scores import ImportanceScores, model_fingerprint
from slimlm.kernels.masked_row_cosine import masked_row_cosine
from slimlm.kernels.masked_seq_stats import masked_seq_stats

WIDTH_METRICS = ("activation", "wanda", "magnitude")
DEPTH_METRICS = ("block_influence", "loss_drop")
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


def _first_rows(value, batch: int, rows: int):
    """``value`` (a layer call's argument) cut to its first ``rows`` samples: tensors whose
    leading dimension is the batch are sliced, containers recursively, the rest kept."""
    if rows == batch:
        return value
    if isinstance(value, torch.Tensor):
        return value[:rows] if value.dim() > 0 and value.shape[0] == batch else value
    if isinstance(value, tuple):
        return tuple(_first_rows(item, batch, rows) for item in value)
    if isinstance(value, list):
        return [_first_rows(item, batch, rows) for item in value]
    if isinstance(value, dict):
        return {key: _first_rows(item, batch, rows) for key, item in value.items()}
    return value


class _Collector:
    """Forward hooks that reduce activations into fp64 sums (all pre-allocated, so every
    rank holds the same keys in the same order for one all-reduce)."""

    def __init__(self, layout: ModelLayout, seq_agg: str, width: bool, wanda: bool, depth: tuple[str, ...], device):
        self.layout = layout
        self.seq_agg = seq_agg
        self.width = width
        self.wanda = wanda
        self.block_influence = "block_influence" in depth
        self.loss_drop = "loss_drop" in depth
        # Off while loss_drop reruns layers: those calls must not add to the statistics.
        self.recording = True
        self.mask: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        # Per layer, its input hidden state and (loss drop) its call's other arguments.
        self.layer_inputs: list[torch.Tensor | None] = []
        self.layer_kwargs: list[tuple[tuple, dict] | None] = []
        self.final_hidden: torch.Tensor | None = None
        self.handles = []
        num_layers = layout.num_layers
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sums: dict[str, torch.Tensor] = {"samples": zeros(), "tokens": zeros(), "pairs": zeros()}
        for i in range(num_layers):
            units = {
                f"head.{i}": layout.num_heads,
                f"neuron.{i}": layout.intermediate_size,
                f"attn_norm.{i}": layout.hidden_size,
                f"mlp_norm.{i}": layout.hidden_size,
            }
            for name, size in units.items():
                if width:
                    self.sums[name + ".first"] = zeros(size)
                    self.sums[name + ".second"] = zeros(size)
            if wanda:
                for name, size in (
                    (f"o_in.{i}", layout.num_heads * layout.head_dim),
                    (f"neuron.{i}", layout.intermediate_size),
                    (f"attn_norm.{i}", layout.hidden_size),
                    (f"mlp_norm.{i}", layout.hidden_size),
                ):
                    self.sums[name + ".squares"] = zeros(size)
        if self.block_influence:
            self.sums["cosine"] = zeros(num_layers)
        if self.loss_drop:
            self.sums["nll_full"] = zeros()
            self.sums["loss_samples"] = zeros()
            self.sums["nll_skip"] = zeros(num_layers)

    # --- hooks ----------------------------------------------------------------------------
    def _reduce(self, name: str, x: torch.Tensor, group: int, squares_name: str | None) -> None:
        if not self.recording:
            return
        if self.width or squares_name is not None:
            stats = masked_seq_stats(x, self.mask, group)
        if self.width:
            per_sample = sequence_aggregate(stats, self.counts, self.seq_agg)
            self.sums[name + ".first"] += per_sample.sum(0)
            self.sums[name + ".second"] += per_sample.square().sum(0)
        if squares_name is not None:
            self.sums[squares_name + ".squares"] += stats[2].sum(0)

    def _norm_hook(self, name: str):
        def hook(module, args, output):
            self._reduce(name, output, 1, name if self.wanda else None)

        return hook

    def _o_proj_hook(self, i: int):
        def hook(module, args):
            self._reduce(f"head.{i}", args[0], self.layout.head_dim, None)
            if self.wanda and self.recording:
                # Wanda weighs o_proj's input channels one by one, not per head: a second reduction.
                self.sums[f"o_in.{i}.squares"] += masked_seq_stats(args[0], self.mask, 1)[2].sum(0)

        return hook

    def _down_proj_hook(self, i: int):
        def hook(module, args):
            self._reduce(f"neuron.{i}", args[0], 1, f"neuron.{i}" if self.wanda else None)

        return hook

    def _layer_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            if not self.recording:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self.layer_inputs[i] = hidden
            if self.loss_drop:
                rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
                self.layer_kwargs[i] = (args[1:], rest)

        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, output):
            if not self.recording:
                return
            hidden_out = output[0] if isinstance(output, tuple) else output
            if self.block_influence:
                cosine = masked_row_cosine(self.layer_inputs[i], hidden_out, self.mask)
                self.sums["cosine"][i] += cosine.sum()
            if not self.loss_drop:
                self.layer_inputs[i] = None
            elif i == self.layout.num_layers - 1:
                self.final_hidden = hidden_out

        return hook

    def attach(self) -> None:
        layout = self.layout
        self.layer_inputs = [None] * layout.num_layers
        self.layer_kwargs = [None] * layout.num_layers
        for i, modules in enumerate(layout.layers):
            if self.width or self.wanda:
                self.handles.append(modules.attention_norm.register_forward_hook(self._norm_hook(f"attn_norm.{i}")))
                self.handles.append(modules.mlp_norm.register_forward_hook(self._norm_hook(f"mlp_norm.{i}")))
                self.handles.append(modules.o_proj.register_forward_pre_hook(self._o_proj_hook(i)))
                self.handles.append(modules.down_proj.register_forward_pre_hook(self._down_proj_hook(i)))
            if self.block_influence or self.loss_drop:
                self.handles.append(modules.layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
                self.handles.append(modules.layer.register_forward_hook(self._layer_hook(i)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # --- per batch ------------------------------------------------------------------------
    def begin_batch(self, attention_mask: torch.Tensor) -> None:
        self.mask = attention_mask.to(torch.bool)
        self.counts = self.mask.sum(1)
        self.sums["samples"] += (self.counts > 0).sum()
        self.sums["tokens"] += self.counts.sum()

    def end_batch(self, input_ids: torch.Tensor, loss_rows: int) -> None:
        """Finish a batch; loss drop runs on its first ``loss_rows`` samples."""
        if self.loss_drop and loss_rows > 0:
            self.recording = False
            try:
                self._loss_drop(input_ids, loss_rows)
            finally:
                self.recording = True
        self.layer_inputs = [None] * self.layout.num_layers
        self.layer_kwargs = [None] * self.layout.num_layers
        self.final_hidden = None

    def _nll_sum(self, hidden: torch.Tensor, input_ids: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        """Σ next-token NLL over pairs of real tokens, one sample at a time (bounds the logits' memory)."""
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        normed = self.layout.final_norm(hidden)
        for b in range(hidden.shape[0]):
            logits = self.layout.lm_head(normed[b, :-1]).float()
            nll = F.cross_entropy(logits, input_ids[b, 1:], reduction="none")
            total += torch.where(pair[b], nll, 0.0).sum(dtype=torch.float64)
        return total

    def _loss_drop(self, input_ids: torch.Tensor, rows: int) -> None:
        batch = input_ids.shape[0]
        take = lambda value: _first_rows(value, batch, rows)  # noqa: E731
        input_ids, mask = input_ids[:rows], self.mask[:rows]
        pair = mask[:, :-1] & mask[:, 1:]
        self.sums["loss_samples"] += rows
        self.sums["pairs"] += pair.sum()
        self.sums["nll_full"] += self._nll_sum(self.final_hidden[:rows], input_ids, pair)
        layers = self.layout.decoder_layers
        for i in range(self.layout.num_layers):
            hidden = self.layer_inputs[i][:rows]
            for j in range(i + 1, self.layout.num_layers):
                args, kwargs = self.layer_kwargs[j]
                hidden = layers[j](hidden, *take(args), **take(kwargs))
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            self.sums["nll_skip"][i] += self._nll_sum(hidden, input_ids, pair)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        names = list(self.sums)
        flat = torch.cat([self.sums[name].reshape(-1) for name in names])
        dist.all_reduce(flat)
        offset = 0
        for name in names:
            size = self.sums[name].numel()
            self.sums[name] = flat[offset : offset + size].view_as(self.sums[name])
            offset += size


def _check_batch(batch: dict, vocab_size: int, max_len: int | None, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(f"calibration batch {index} must be a dict with 'input_ids' (and 'attention_mask')")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"calibration batch {index}: input_ids must be an integer (batch, seq) tensor")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"calibration batch {index}: attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"calibration batch {index}: token ids must be in [0, {vocab_size}) (the model's vocab_size)")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(
            f"calibration batch {index}: sequence length {input_ids.shape[1]} is above the model's limit "
            f"(max_position_embeddings = {max_len})"
        )
    return input_ids, mask


def _batches(calibration, batch_size: int, num_samples: int | None) -> Iterator[dict]:
    """Batches of at most ``num_samples`` samples in all: tensors are cut into ``batch_size`` rows,
    iterables of batch dicts are used as given (the last one trimmed)."""
    if hasattr(calibration, "input_ids") and hasattr(calibration, "attention_mask"):  # slimlm.data.TokenBlocks
        calibration = {"input_ids": calibration.input_ids, "attention_mask": calibration.attention_mask}
    if isinstance(calibration, torch.Tensor):
        calibration = {"input_ids": calibration}
    if isinstance(calibration, dict):
        input_ids = calibration.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("calibration tensor must be a (samples, seq) LongTensor of token ids")
        mask = calibration.get("attention_mask")
        total = input_ids.shape[0] if num_samples is None else min(num_samples, input_ids.shape[0])
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield {
                "input_ids": input_ids[start:stop],
                "attention_mask": mask[start:stop] if mask is not None else None,
            }
        return
    if not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be a LongTensor or an iterable of batches, got {type(calibration).__name__}")
    seen = 0
    for batch in calibration:
        if num_samples is not None and seen >= num_samples:
            return
        if isinstance(batch, dict) and num_samples is not None and isinstance(batch.get("input_ids"), torch.Tensor):
            keep = num_samples - seen
            batch = {key: value[:keep] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        seen += batch["input_ids"].shape[0] if isinstance(batch, dict) and "input_ids" in batch else 1
        yield batch


def _weight_scores(layout: ModelLayout, metric: str, sums: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``magnitude`` or ``wanda`` scores for head, neuron and hidden (fp32, on the CPU).

    Computed in fp32 on the weights' device, one matrix at a time (one |W| or W² temporary).
    """
    num_heads, head_dim = layout.num_heads, layout.head_dim
    device = layout.embedding.weight.device
    heads, neurons = [], []
    hidden = torch.zeros(layout.hidden_size, dtype=torch.float32, device=device)
    f = lambda t: t.detach().float()  # noqa: E731
    if metric == "magnitude":
        reduce = lambda t: f(t).square()  # noqa: E731
    else:
        reduce = lambda t: f(t).abs()  # noqa: E731
    for i, m in enumerate(layout.layers):
        q, k, v, o = reduce(m.q_weight), reduce(m.k_weight), reduce(m.v_weight), reduce(m.o_proj.weight)
        gate, up, down = reduce(m.gate_weight), reduce(m.up_weight), reduce(m.down_proj.weight)
        if metric == "magnitude":
            q_rows = q.sum(1) + (f(m.q_bias).square() if m.q_bias is not None else 0)
            heads.append((q_rows + o.sum(0)).view(num_heads, head_dim).sum(1).sqrt())
            neurons.append((gate.sum(1) + up.sum(1) + down.sum(0)).sqrt())
            hidden += q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0) + o.sum(1) + down.sum(1)
            for norm in (m.attention_norm, m.mlp_norm):
                if getattr(norm, "weight", None) is not None:
                    hidden += f(norm.weight).square()
        else:
            x_attn = sums[f"attn_norm.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_mlp = sums[f"mlp_norm.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_o = sums[f"o_in.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_down = sums[f"neuron.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            head = q @ x_attn + o.sum(0) * x_o
            heads.append(head.view(num_heads, head_dim).sum(1))
            neurons.append(gate @ x_mlp + up @ x_mlp + down.sum(0) * x_down)
            hidden += x_attn * (q.sum(0) + k.sum(0) + v.sum(0)) + x_mlp * (gate.sum(0) + up.sum(0))
            hidden += o @ x_o + down @ x_down
    if metric == "magnitude":
        hidden += f(layout.embedding.weight).square().sum(0)
        if not layout.tied_embeddings:
            hidden += f(layout.lm_head.weight).square().sum(0)
        if getattr(layout.final_norm, "weight", None) is not None:
            hidden += f(layout.final_norm.weight).square()
        hidden = hidden.sqrt()
    return {"head": torch.stack(heads).cpu(), "neuron": torch.stack(neurons).cpu(), "hidden": hidden.cpu()}


def _check_options(metrics, depth, seq_agg, batch_agg, batch_size, num_samples) -> tuple[tuple, tuple]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics or ())
    depth = (depth,) if isinstance(depth, str) else tuple(depth or ())
    for name in metrics:
        if name not in WIDTH_METRICS:
            raise ValueError(f"unknown width metric {name!r}; choose from {', '.join(WIDTH_METRICS)}")
    for name in depth:
        if name not in DEPTH_METRICS:
            raise ValueError(f"unknown depth metric {name!r}; choose from {', '.join(DEPTH_METRICS)}")
    if not metrics and not depth:
        raise ValueError("nothing to score: metrics and depth are both empty")
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
    several devices, which is used where it lies). Returns scores keyed ``"<metric>.<axis>"``
    (see the module docstring for the definitions) with ``meta`` recording the model's
    fingerprint, metrics, aggregations and counts.
    """
    metrics, depth = _check_options(metrics, depth, seq_agg, batch_agg, batch_size, num_samples)
    if loss_drop_samples is not None and (not isinstance(loss_drop_samples, int) or loss_drop_samples < 1):
        raise ValueError(f"loss_drop_samples must be a positive integer or None, got {loss_drop_samples!r}")
    layout = model_layout(model)
    config = model.config
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    data_metrics = [m for m in metrics if m != "magnitude"]
    needs_data = bool(data_metrics or depth)

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    collector = _Collector(layout, seq_agg, "activation" in metrics, "wanda" in metrics, depth, device)
    was_training = model.training
    move = device != home
    if needs_data:
        if move:
            model.to(device)
        model.eval()
        collector.attach()
        try:
            batches = _batches(calibration, batch_size, num_samples)
            iterator = tqdm(batches, desc="importance", unit="batch", disable=not progress or rank != 0)
            max_len = getattr(config, "max_position_embeddings", None)
            seen = 0  # samples of all ranks so far: the loss-drop subset is the same in every layout
            with torch.no_grad():
                for index, batch in enumerate(iterator):
                    input_ids, mask = _check_batch(batch, config.vocab_size, max_len, index)
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
            raise ValueError("the calibration data holds no real tokens (every attention_mask entry is 0)")
        if "loss_drop" in depth and collector.sums["pairs"].item() == 0:
            raise ValueError("loss_drop needs samples with at least two real tokens")

    sums = {name: value.cpu() for name, value in collector.sums.items()}
    scores: dict[str, torch.Tensor] = {}
    kv_groups = layout.num_kv_heads
    for metric in metrics:
        if metric == "activation":
            samples = sums["samples"]
            agg = lambda name: batch_aggregate(sums[name + ".first"], sums[name + ".second"], samples, batch_agg)  # noqa: E731
            per_axis = {
                "head": torch.stack([agg(f"head.{i}") for i in range(layout.num_layers)]),
                "neuron": torch.stack([agg(f"neuron.{i}") for i in range(layout.num_layers)]),
                "hidden": sum(agg(f"attn_norm.{i}") + agg(f"mlp_norm.{i}") for i in range(layout.num_layers)),
            }
        else:
            per_axis = _weight_scores(layout, metric, sums)
        head = per_axis["head"].float()
        scores[f"{metric}.head"] = head
        scores[f"{metric}.kv_group"] = head.view(layout.num_layers, kv_groups, -1).sum(-1)
        scores[f"{metric}.neuron"] = per_axis["neuron"].float()
        scores[f"{metric}.hidden"] = per_axis["hidden"].float()
    if "block_influence" in depth:
        scores["block_influence.layer"] = (1.0 - sums["cosine"] / sums["tokens"]).float()
    if "loss_drop" in depth:
        full = sums["nll_full"] / sums["pairs"]
        scores["loss_drop.layer"] = (sums["nll_skip"] / sums["pairs"] - full).float()

    meta = {
        "fingerprint": model_fingerprint(model),
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
