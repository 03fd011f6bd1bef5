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
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

AXES = ("head", "kv_group", "neuron", "hidden", "layer")
WIDTH_AXES = ("head", "kv_group", "neuron", "hidden")
SCORES_FILE = "scores.safetensors"
META_FILE = "meta.json"
# Config fields that decide the shape of every score tensor.
_SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "head_dim",
    "vocab_size",
)


def model_fingerprint(model) -> str:
    """Identifies a model's shape and weights: its shape-deciding config fields plus a
    hash of the first rows of its input embedding (cheap, and differs between checkpoints)."""
    config = model.config
    digest = hashlib.sha256()
    digest.update(json.dumps({k: getattr(config, k, None) for k in _SHAPE_FIELDS}, sort_keys=True).encode())
    embedding = model.get_input_embeddings().weight
    digest.update(embedding[:8].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


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

    def check_model(self, model, source: str = "these scores") -> None:
        """Raise ValueError unless the scores were computed on ``model`` (same fingerprint)."""
        expected = self.meta.get("fingerprint")
        actual = model_fingerprint(model)
        if expected is not None and expected != actual:
            name = self.meta.get("model_name", "another model")
            raise ValueError(
                f"{source} were computed on {name} (fingerprint {expected}), not on this model "
                f"(fingerprint {actual}); recompute them with slimlm.importance.estimate_importance"
            )

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``scores.safetensors`` and ``meta.json`` into ``folder`` (created; files replaced atomically)."""
        os.makedirs(folder, exist_ok=True)
        tensors = {key: value.detach().float().cpu().contiguous() for key, value in self.scores.items()}
        tmp_scores = os.path.join(folder, SCORES_FILE + ".tmp")
        tmp_meta = os.path.join(folder, META_FILE + ".tmp")
        save_file(tensors, tmp_scores)
        with open(tmp_meta, "w") as handle:
            json.dump(self.meta, handle, indent=2, sort_keys=True)
        os.replace(tmp_scores, os.path.join(folder, SCORES_FILE))
        os.replace(tmp_meta, os.path.join(folder, META_FILE))

    @classmethod
    def load(cls, folder: str | os.PathLike, model=None) -> "ImportanceScores":
        """Read a folder written by ``save``; with ``model``, check they belong to it."""
        scores_path = os.path.join(folder, SCORES_FILE)
        meta_path = os.path.join(folder, META_FILE)
        for path in (scores_path, meta_path):
            if not os.path.isfile(path):
                raise ValueError(f"{folder} is not an importance-scores folder: {path} is missing")
        with open(meta_path) as handle:
            try:
                meta = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
        scores = cls(scores=dict(load_file(scores_path)), meta=meta)
        for key in scores.scores:
            metric, _, axis = key.partition(".")
            if axis not in AXES:
                raise ValueError(f"{scores_path}: unexpected tensor {key!r} (expected '<metric>.<axis>', axes {AXES})")
        if model is not None:
            scores.check_model(model, source=f"the scores in {folder}")
        return scores
