"""The search space of ``slimlm.search``: every uniform shape a model can be pruned to and
saved as, each with its exact size (which of them meet a budget: ``slimlm.search.budget``).

A shape is (hidden_size, intermediate_size, query heads per KV group, KV groups, num_layers),
each axis between its floor (``SearchSpace``: by default at most 40% width and 20% depth
pruning per axis, Model Optimizer's defaults) and its current size, widths on the
planner's grid (multiples of ``multiple_of`` where enough of them lie above the floor),
hidden sizes divisible by the head count where the family demands it, and every shape's
config accepted by transformers' own validation.

Sizes are exact: a uniform model has ``P = rest(H) + L · (attention(H, heads, KV) + mlp(H, I)
+ layer_norms(H))``, and each term is read from a one-layer meta-device model of that width
(``ParameterCounter``), cached per axis, so thousands of shapes cost a few dozen meta builds.
Memory = P · bytes(dtype) + KV cache, the cache being 2 (K and V) · L · KV heads · head_dim ·
batch · seq · bytes(dtype), every layer caching the whole sequence (an upper bound for
sliding-window layers).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from itertools import product

import torch

from slimlm.architectures import get_adapter, model_sizes
from slimlm.surgery.planning import DEPTH_SELECTIONS, Target, _grid, from_fields, count_parameters, meta_model, pruned_config

# The axes of a shape, as search.json and the CSV name them.
AXES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers")
# Floors a user may set per axis (query heads are floored per KV group).
FLOOR_AXES = ("hidden_size", "intermediate_size", "heads_per_group", "num_key_value_heads", "num_layers")


@dataclass(frozen=True)
class SearchSpace:
    """The shapes searched: at most ``max_width_prune`` of each width axis (hidden, MLP,
    query heads per KV group, KV groups) and ``max_depth_prune`` of the layers pruned, widths
    on multiples of ``multiple_of`` (as the planner's grid), ``min_sizes`` overriding the
    floors per axis (keys ``FLOOR_AXES``), and the layer choices ``depth_selections`` (each
    depth-pruned shape is tried once per choice)."""

    max_width_prune: float = 0.4
    max_depth_prune: float = 0.2
    multiple_of: int = 64
    min_sizes: dict | None = None
    depth_selections: tuple[str, ...] = ("least_important",)

    @classmethod
    def coerce(cls, value) -> "SearchSpace":
        """A SearchSpace from a SearchSpace, None (the defaults) or a dict of fields (a recipe's)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            value = dict(value)
            if isinstance(value.get("depth_selections"), list):
                value["depth_selections"] = tuple(value["depth_selections"])
            return from_fields(cls, value, "search space")
        raise ValueError(f"space must be a SearchSpace, a dict or None, got {type(value).__name__}")

    def check(self) -> None:
        for name in ("max_width_prune", "max_depth_prune"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise ValueError(f"multiple_of must be a positive int, got {self.multiple_of!r}")
        unknown = sorted(set(self.min_sizes or {}) - set(FLOOR_AXES))
        if unknown:
            raise ValueError(f"unknown min_sizes axis {', '.join(unknown)}; axes: {', '.join(FLOOR_AXES)}")
        bad = [d for d in self.depth_selections if d not in DEPTH_SELECTIONS]
        if bad or not self.depth_selections:
            raise ValueError(f"depth_selections must be a non-empty subset of {', '.join(DEPTH_SELECTIONS)}, "
                             f"got {self.depth_selections!r}")

    def floor(self, axis: str, current: int) -> int:
        stated = (self.min_sizes or {}).get(axis)
        if stated is not None:
            if isinstance(stated, bool) or not isinstance(stated, int) or not 1 <= stated:
                raise ValueError(f"min_sizes[{axis!r}] must be a positive int, got {stated!r}")
            return min(stated, current)
        prune = self.max_depth_prune if axis == "num_layers" else self.max_width_prune
        return max(1, math.ceil(round((1 - prune) * current, 9)))


@dataclass(frozen=True)
class Candidate:
    """One student shape, its exact parameter count and its memory at the budget's batch × seq
    (None for a parameter budget without them)."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_layers: int
    depth_selection: str
    params: int
    memory_bytes: int | None

    @property
    def key(self) -> str:
        """A stable name (resume matches finished candidates by it)."""
        depth = "" if self.depth_selection == "least_important" else f"-{self.depth_selection}"
        return (f"h{self.hidden_size}-i{self.intermediate_size}-q{self.num_attention_heads}"
                f"-kv{self.num_key_value_heads}-l{self.num_layers}{depth}")

    def sizes(self) -> dict:
        return {axis: getattr(self, axis) for axis in AXES}

    def target(self) -> Target:
        """The ``Target`` that prunes to this shape (``prune(model, scores, candidate.target())``)."""
        return Target(**self.sizes(), depth_selection=self.depth_selection)

    def to_dict(self) -> dict:
        return asdict(self)


class ParameterCounter:
    """Exact parameter counts of uniform shapes of one model, from one-layer meta-device
    models, cached per axis: ``rest`` (embeddings, LM head, final norm) and ``layer_norms`` by
    hidden size, ``attention`` by (hidden, heads, KV heads), ``mlp`` by (hidden, MLP width).
    ``builds`` counts the meta models made."""

    def __init__(self, model_or_config, model_class=None):
        self.config = getattr(model_or_config, "config", model_or_config)
        self.adapter = get_adapter(model_or_config, "slimlm.search", "searches")
        if model_class is None:
            is_model = model_or_config is not self.config
            model_class = type(model_or_config) if is_model else self.adapter.causal_lm_class
        self.model_class = model_class
        self.before = model_sizes(self.config)
        self.rest: dict[int, int] = {}
        self.layer_norms: dict[int, int] = {}
        self.attention: dict[tuple, int] = {}
        self.mlp: dict[tuple, int] = {}
        # Width → None (legal) or transformers' reason to reject it.
        self.verdicts: dict[tuple, str | None] = {}
        self.builds = 0

    def _config(self, hidden: int, intermediate: int, heads: int, kv: int):
        """The one-layer config of this width, validated by transformers (ValueError if rejected)."""
        sizes = {**self.before, "hidden_size": hidden, "intermediate_size": intermediate,
                 "num_attention_heads": heads, "num_key_value_heads": kv, "num_layers": 1}
        return pruned_config(self.config, self.adapter, sizes, [0])

    def _build(self, config, hidden: int, intermediate: int, heads: int, kv: int) -> None:
        model = meta_model(self.model_class, config)
        self.builds += 1
        parts = count_parameters(model, self.adapter)
        layer_total = sum(p.numel() for p in self.adapter.layers(model)[0].parameters())
        self.attention[(hidden, heads, kv)] = parts["attention"]
        self.mlp[(hidden, intermediate)] = parts["mlp"]
        self.layer_norms[hidden] = layer_total - parts["attention"] - parts["mlp"]
        self.rest[hidden] = parts["total"] - layer_total

    def legal(self, hidden: int, intermediate: int, heads: int, kv: int) -> bool:
        """Whether transformers accepts this width (its config validation, run once per
        combination of widths); counts its parts when they are not cached yet."""
        key = (hidden, intermediate, heads, kv)
        if key not in self.verdicts:
            try:
                config = self._config(*key)
            except ValueError as error:
                self.verdicts[key] = str(error)
                return False
            self.verdicts[key] = None
            if (hidden, heads, kv) not in self.attention or (hidden, intermediate) not in self.mlp:
                self._build(config, *key)
        return self.verdicts[key] is None

    def count(self, hidden: int, intermediate: int, heads: int, kv: int, layers: int) -> int:
        """Total parameters (a tied LM head once) of the uniform shape; the width must be ``legal``."""
        per_layer = self.attention[(hidden, heads, kv)] + self.mlp[(hidden, intermediate)] + self.layer_norms[hidden]
        return self.rest[hidden] + layers * per_layer

    def kv_cache_bytes(self, kv: int, layers: int, batch: int, seq: int, dtype: torch.dtype) -> int:
        return 2 * layers * kv * self.before["head_dim"] * batch * seq * dtype.itemsize


def axis_values(counter: ParameterCounter, space: SearchSpace) -> dict:
    """The values each axis may take (ascending, current size last); hidden sizes per head
    count where the family needs hidden % heads == 0."""
    before = counter.before
    group = before["num_attention_heads"] // before["num_key_value_heads"]

    def span(axis, current):
        return list(range(space.floor(axis, current), current + 1))

    groups = span("heads_per_group", group)
    kv_groups = span("num_key_value_heads", before["num_key_value_heads"])
    head_choices = sorted({(g * k, k) for g, k in product(groups, kv_groups)})
    hidden_span = span("hidden_size", before["hidden_size"])
    hidden = {}
    for heads, _ in head_choices:
        values = [v for v in hidden_span if v % heads == 0] if counter.adapter.hidden_multiple_of_heads else hidden_span
        hidden[heads] = _grid(values, space.multiple_of) if values else []
    return {
        "heads": head_choices,
        "hidden_size": hidden,
        "intermediate_size": _grid(span("intermediate_size", before["intermediate_size"]), space.multiple_of),
        "num_layers": span("num_layers", before["num_layers"]),
    }


def enumerate_shapes(model, space: SearchSpace | None = None, *, memory_at: tuple | None = None,
                     dtype: torch.dtype | None = None, counter: ParameterCounter | None = None) -> list[Candidate]:
    """Every legal uniform shape of ``space`` (the unpruned one included), with its parameter
    count and, with ``memory_at=(batch, seq)``, its memory in ``dtype`` (default: the model's)."""
    space = space or SearchSpace()
    space.check()
    counter = counter or ParameterCounter(model)
    values = axis_values(counter, space)
    dtype = dtype or _model_dtype(model)
    num_layers = counter.before["num_layers"]
    shapes = []
    for heads, kv in values["heads"]:
        for hidden, intermediate in product(values["hidden_size"][heads], values["intermediate_size"]):
            if not counter.legal(hidden, intermediate, heads, kv):
                continue
            for layers in values["num_layers"]:
                params = counter.count(hidden, intermediate, heads, kv, layers)
                memory = None
                if memory_at is not None:
                    memory = params * dtype.itemsize + counter.kv_cache_bytes(kv, layers, *memory_at, dtype)
                for depth in space.depth_selections if layers < num_layers else ("least_important",):
                    shapes.append(Candidate(hidden, intermediate, heads, kv, layers, depth, params, memory))
    return shapes


def _model_dtype(model) -> torch.dtype:
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.dtype if parameter is not None else getattr(model, "dtype", torch.float32)
