"""The calibration pass's forward hooks: activations reduced into fp64 sums as they go by.

Per decoder layer (where the family's adapter says they are): the input of ``o_proj``
(heads, and Wanda's per-channel norms), the input of ``down_proj`` (neurons), the outputs
of the two norms that feed the attention and MLP blocks (hidden channels), and the layer's
input and output (depth metrics; with loss drop, also the layer's call arguments, for the
reruns of ``depth.add_loss_drop``). Every sum is allocated up front, so every rank holds the
same keys in the same order for one all-reduce.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from slimlm.architectures import DecoderAdapter
from slimlm.importance.activation import sequence_aggregate
from slimlm.importance.depth import add_loss_drop
from slimlm.kernels.masked_row_cosine import masked_row_cosine
from slimlm.kernels.masked_seq_stats import masked_seq_stats


class Collector:
    """Hooks on ``model`` and the sums they fill (``sums``)."""

    def __init__(self, model, adapter: DecoderAdapter, sizes: dict, seq_agg: str, width: bool, wanda: bool,
                 depth: tuple[str, ...], device):
        self.model = model
        self.adapter = adapter
        self.sizes = sizes
        self.seq_agg = seq_agg
        self.width = width
        self.wanda = wanda
        self.block_influence = "block_influence" in depth
        self.loss_drop = "loss_drop" in depth
        # Off while loss_drop reruns layers: those calls must not add to the statistics.
        self.recording = True
        self.mask: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self.num_layers = sizes["num_layers"]
        # Per layer, its input hidden state and (loss drop) its call's other arguments.
        self.layer_inputs: list[torch.Tensor | None] = []
        self.layer_kwargs: list[tuple[tuple, dict] | None] = []
        self.final_hidden: torch.Tensor | None = None
        self.handles = []
        zeros = lambda *shape: torch.zeros(shape, dtype=torch.float64, device=device)  # noqa: E731
        self.sums: dict[str, torch.Tensor] = {"samples": zeros(), "tokens": zeros(), "pairs": zeros()}
        hidden, heads, intermediate = sizes["hidden_size"], sizes["num_attention_heads"], sizes["intermediate_size"]
        for i in range(self.num_layers):
            units = {f"head.{i}": heads, f"neuron.{i}": intermediate, f"attn_norm.{i}": hidden, f"mlp_norm.{i}": hidden}
            for name, size in units.items():
                if width:
                    self.sums[name + ".first"] = zeros(size)
                    self.sums[name + ".second"] = zeros(size)
            if wanda:
                for name, size in (
                    (f"o_in.{i}", heads * sizes["head_dim"]),
                    (f"neuron.{i}", intermediate),
                    (f"attn_norm.{i}", hidden),
                    (f"mlp_norm.{i}", hidden),
                ):
                    self.sums[name + ".squares"] = zeros(size)
        if self.block_influence:
            self.sums["cosine"] = zeros(self.num_layers)
        if self.loss_drop:
            self.sums["nll_full"] = zeros()
            self.sums["loss_samples"] = zeros()
            self.sums["nll_skip"] = zeros(self.num_layers)

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
            self._reduce(f"head.{i}", args[0], self.sizes["head_dim"], None)
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
            elif i == self.num_layers - 1:
                self.final_hidden = hidden_out

        return hook

    def attach(self) -> None:
        adapter = self.adapter
        self.layer_inputs = [None] * self.num_layers
        self.layer_kwargs = [None] * self.num_layers
        for i, layer in enumerate(adapter.layers(self.model)):
            if self.width or self.wanda:
                attention_norm, mlp_norm = adapter.block_inputs(layer)
                self.handles.append(attention_norm.register_forward_hook(self._norm_hook(f"attn_norm.{i}")))
                self.handles.append(mlp_norm.register_forward_hook(self._norm_hook(f"mlp_norm.{i}")))
                self.handles.append(adapter.attention(layer).o.register_forward_pre_hook(self._o_proj_hook(i)))
                self.handles.append(adapter.mlp(layer).down.register_forward_pre_hook(self._down_proj_hook(i)))
            if self.block_influence or self.loss_drop:
                self.handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
                self.handles.append(layer.register_forward_hook(self._layer_hook(i)))

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
                adapter, model = self.adapter, self.model
                add_loss_drop(self.sums, adapter.layers(model), adapter.final_norm(model), adapter.head(model),
                              self.layer_inputs, self.layer_kwargs, self.final_hidden, input_ids, self.mask, loss_rows)
            finally:
                self.recording = True
        self.layer_inputs = [None] * self.num_layers
        self.layer_kwargs = [None] * self.num_layers
        self.final_hidden = None

    def all_reduce(self) -> None:
        names = list(self.sums)
        flat = torch.cat([self.sums[name].reshape(-1) for name in names])
        dist.all_reduce(flat)
        offset = 0
        for name in names:
            size = self.sums[name].numel()
            self.sums[name] = flat[offset : offset + size].view_as(self.sums[name])
            offset += size
