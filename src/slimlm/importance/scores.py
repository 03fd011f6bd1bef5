"""ImportanceScores: the scores of every prunable unit of one model, saved for reuse.

Scores are stored flat as ``"<metric>.<axis>"`` tensors (higher = more important):

=========  =====================================  ==========================================
axis       shape                                   unit
=========  =====================================  ==========================================
head       (num_layers, num_attention_heads)       a query head in a layer
kv_group   (num_layers, num_key_value_heads)       a KV group (the sum of its query heads)
neuron     (num_layers, intermediate_size)         an MLP neuron in a layer
hidden     (hidden_size,)                          a hidden/embedding channel (all layers)
layer      (num_layers,)                           a whole decoder layer (depth metrics)
=========  =====================================  ==========================================

Width metrics: ``activation``, ``wanda``, ``magnitude``; depth metrics: ``block_influence``,
``loss_drop``. ``meta`` records which model (``fingerprint``) and how (metric, aggregation,
number of samples); loading against another model is an error.

Query heads are grouped as transformers' ``repeat_kv`` lays them out: with g = heads / KV heads,
query head h belongs to KV group h // g. ``kv_group_scores`` is the one statement of the rule.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint

AXES = ("head", "kv_group", "neuron", "hidden", "layer")
WIDTH_AXES = ("head", "kv_group", "neuron", "hidden")
SCORES_FILE = "scores.safetensors"
META_FILE = "meta.json"
def kv_group_scores(head_scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(layers, KV heads) scores from (layers, heads): a KV group is worth the sum of its query
    heads h, those with h // (heads / KV heads) equal to the group's index."""
    return head_scores.view(head_scores.shape[0], num_kv_heads, -1).sum(-1)


@dataclass
class ImportanceScores:
    """Per-unit importance of one model (module docstring lists keys and shapes)."""

    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def metrics(self, axis: str) -> list[str]:
        """Metrics that scored ``axis``, in the order they were added."""
        return [key.split(".", 1)[0] for key in self.scores if key.split(".", 1)[1] == axis]

    def get(self, axis: str, metric: str | None = None) -> torch.Tensor:
        """Scores of ``axis`` by ``metric`` (default: the first metric that scored the axis)."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; axes are {', '.join(AXES)}")
        available = self.metrics(axis)
        if not available:
            raise ValueError(f"no scores for axis {axis!r}; have {', '.join(self.scores) or 'none'}")
        if metric is None:
            metric = available[0]
        key = f"{metric}.{axis}"
        if key not in self.scores:
            raise ValueError(f"no {metric!r} scores for axis {axis!r}; metrics for it: {', '.join(available)}")
        return self.scores[key]

    def has(self, axis: str) -> bool:
        return bool(self.metrics(axis))

    def layer_scores(self, metric: str | None = None) -> torch.Tensor:
        """Per-layer depth scores (``layer`` axis) by ``metric`` (default: the first depth metric)."""
        return self.get("layer", metric)

    def best_layers(self, k: int, metric: str | None = None) -> list[int]:
        """The ``k`` least important layers — the best ``k`` to drop — in increasing index order.

        Lower depth score = less important (block influence: the layer changes its input
        least; loss drop: skipping it raises the calibration loss least).
        """
        scores = self.layer_scores(metric)
        self._check_k(k, scores.numel())
        return sorted(torch.argsort(scores, stable=True)[:k].tolist())

    def best_contiguous_block(self, k: int, metric: str | None = None) -> list[int]:
        """The ``k`` consecutive layers whose summed depth score is lowest — the best block to drop.

        Summing per-layer scores treats each layer's effect as independent (exact for
        neither metric, but the published contiguous-block choices follow it); ties go to
        the earliest block.
        """
        scores = self.layer_scores(metric).double()
        self._check_k(k, scores.numel())
        window_sums = scores.unfold(0, k, 1).sum(-1)
        start = int(torch.argmin(window_sums))
        return list(range(start, start + k))

    @staticmethod
    def _check_k(k: int, num_layers: int) -> None:
        if not isinstance(k, int) or not 1 <= k < num_layers:
            raise ValueError(f"k must be an integer in [1, {num_layers - 1}] for a {num_layers}-layer model, got {k!r}")

    def summary(self, print_table: bool = True) -> str:
        """A readable table of every score tensor (shape, min/median/max, least important units)
        and, for depth metrics, the per-layer scores and suggested layers to drop. Printed and returned."""
        lines = []
        meta = self.meta
        if meta:
            lines.append(
                f"importance of {meta.get('model_name', '?')} ({meta.get('model_type', '?')}, fingerprint "
                f"{meta.get('fingerprint', '?')}): {meta.get('num_samples', '?')} samples, "
                f"{meta.get('num_tokens', '?')} tokens, seq_agg={meta.get('seq_agg', '?')}, "
                f"batch_agg={meta.get('batch_agg', '?')}"
            )
        lines.append(f"{'scores':<24}{'shape':>14}{'min':>12}{'median':>12}{'max':>12}  least important")
        for key, value in self.scores.items():
            flat = value.detach().float().flatten().cpu()
            lowest = torch.argsort(flat, stable=True)[:3].tolist()
            if value.dim() == 2:
                width = value.shape[1]
                where = ", ".join(f"L{index // width}:{index % width}" for index in lowest)
            else:
                where = ", ".join(str(index) for index in lowest)
            lines.append(
                f"{key:<24}{str(tuple(value.shape)):>14}{flat.min().item():>12.4g}{flat.median().item():>12.4g}"
                f"{flat.max().item():>12.4g}  {where}"
            )
        depth = self.metrics("layer")
        if depth:
            layers = self.scores[f"{depth[0]}.layer"].numel()
            lines.append("")
            lines.append("layer" + "".join(f"{name:>18}" for name in depth))
            for i in range(layers):
                lines.append(f"{i:>5}" + "".join(f"{self.scores[name + '.layer'][i].item():>18.5g}" for name in depth))
            quarter = max(1, layers // 4)
            for name in depth:
                if layers > 1:
                    lines.append(
                        f"drop {quarter} by {name}: least important {self.best_layers(quarter, name)}, "
                        f"best contiguous block {self.best_contiguous_block(quarter, name)}"
                    )
        text = "\n".join(lines)
        if print_table:
            print(text)
        return text

    def plot(self, path: str | os.PathLike) -> str:
        """Draw every score tensor into one PNG at ``path``: per-layer heatmaps for heads, KV
        groups and neurons, a line over channels for hidden, bars per layer for depth. Returns the path."""
        try:
            # The Figure API draws without pyplot, so the caller's backend is left alone.
            from matplotlib.colors import LogNorm
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            raise ValueError("ImportanceScores.plot needs matplotlib (pip install 'slimlm[plot]')") from None
        if not self.scores:
            raise ValueError("no scores to plot")

        # Metric by metric, axes in AXES order (a loaded file's tensors come back sorted by name).
        keys = sorted(self.scores, key=lambda key: (key.split(".", 1)[0], AXES.index(key.split(".", 1)[1])))
        columns = 2
        rows = -(-len(keys) // columns)
        figure = Figure(figsize=(7 * columns, 3.2 * rows))
        axes = figure.subplots(rows, columns, squeeze=False)
        for ax, key in zip(axes.flat, keys):
            value = self.scores[key].detach().float().cpu()
            axis = key.split(".", 1)[1]
            positive = bool((value > 0).all())
            # A few outlier units (massive activations) would flatten a linear scale.
            wide = positive and float(value.max() / value.min()) > 100
            if axis == "layer":
                ax.bar(range(value.numel()), value.numpy(), color="tab:blue")
                ax.set_xlabel("layer")
            elif axis == "hidden":
                ax.plot(value.numpy(), linewidth=0.6)
                ax.set_yscale("log" if positive else "linear")
                ax.set_xlabel("hidden channel")
            else:
                norm = LogNorm(vmin=float(value.min()), vmax=float(value.max())) if wide else None
                image = ax.imshow(value.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
                figure.colorbar(image, ax=ax)
                ax.set_xlabel(axis)
                ax.set_ylabel("layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(key + (" (log colour scale)" if wide and value.dim() == 2 else ""))
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        title = os.path.basename(str(self.meta.get("model_name", "")).rstrip("/"))
        if title:
            figure.suptitle(f"importance of {title} ({self.meta.get('num_samples', '?')} samples)")
            figure.tight_layout(rect=(0, 0, 1, 0.98))
        else:
            figure.tight_layout()
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        figure.savefig(path, dpi=110)
        return path

    def check_model(self, model, source: str = "these scores") -> None:
        """Raise InputError (a ValueError) unless the scores were computed on ``model`` (same fingerprint)."""
        expected = self.meta.get("fingerprint")
        actual = model_fingerprint(model)
        if expected is not None and expected != actual:
            name = self.meta.get("model_name", "another model")
            raise InputError(
                f"{source} were computed on {name} (fingerprint {expected}), not on this model "
                f"(fingerprint {actual}); recompute them with slimlm importance "
                "(slimlm.importance.estimate_importance in Python)"
            )

    def save(self, folder: str | os.PathLike) -> None:
        """Make ``folder`` a scores folder (``scores.safetensors`` + ``meta.json``), put in place
        whole through ``slimlm.outputs.atomic_output``: an existing folder is replaced, at every
        instant ``folder`` holds the old or the new scores, and a failure leaves it as it was."""
        with outputs.atomic_output(folder) as staging:
            self.write(staging)

    def write(self, folder: str | os.PathLike) -> None:
        """Write ``scores.safetensors`` and ``meta.json`` into the existing folder ``folder``, as
        is: for a staging folder of ``slimlm.outputs.atomic_output`` (atomicity is the caller's)."""
        tensors = {key: value.detach().float().cpu().contiguous() for key, value in self.scores.items()}
        save_file(tensors, os.path.join(folder, SCORES_FILE))
        with open(os.path.join(folder, META_FILE), "w", encoding="utf-8") as handle:
            json.dump(self.meta, handle, indent=2, sort_keys=True)

    @classmethod
    def load(cls, folder: str | os.PathLike, model=None) -> "ImportanceScores":
        """Read a folder written by ``save``; with ``model``, check they belong to it. A folder
        that is not one, or scores of another model, is an InputError naming the folder."""
        scores_path = os.path.join(folder, SCORES_FILE)
        meta_path = os.path.join(folder, META_FILE)
        for path in (scores_path, meta_path):
            if not os.path.isfile(path):
                raise InputError(f"{folder} is not an importance-scores folder: {path} is missing")
        with open(meta_path) as handle:
            try:
                meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise InputError(f"{meta_path} is not valid JSON: {error}") from None
        scores = cls(scores=dict(load_file(scores_path)), meta=meta)
        for key in scores.scores:
            metric, _, axis = key.partition(".")
            if axis not in AXES:
                raise InputError(f"{scores_path}: unexpected tensor {key!r} (expected '<metric>.<axis>', axes {AXES})")
        if model is not None:
            scores.check_model(model, source=f"the scores in {folder}")
        return scores
