"""What to prune: a ``Target`` (explicit sizes or a parameter budget) becomes a ``PrunePlan``.

``plan(model, target)`` is a dry run: it reads only the config, checks every size,
builds the pruned config (so transformers' own validation runs before any weight is
touched) and counts parameters on a meta-device model of it. With a budget
(``target_params``) the planner shrinks, in this order and each only as far as needed,
MLP width, hidden size, query heads per KV group, then depth (Minitron's finding: prune
MLP hardest, depth last), rounding widths to multiples of ``multiple_of`` (64) where the
model allows and never going below the per-axis minimums.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields

import torch

from slimlm.architectures import PARTS, DecoderAdapter, get_adapter, model_sizes

SIZE_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers")
# Default floors of the budget planner, as fractions of the original size.
DEFAULT_MIN_FRACTION = {"hidden_size": 0.5, "intermediate_size": 0.25, "num_attention_heads": 0.5, "num_layers": 0.5}
# The order in which the budget planner shrinks axes (the KV groups it keeps, as Minitron does).
BUDGET_ORDER = ("intermediate_size", "hidden_size", "num_attention_heads", "num_layers")
# Which layers go when depth is cut by a count: the k least important layers one by one, or
# the contiguous block of k whose summed depth score is lowest (Minitron's Llama-3.1-4B-Depth).
DEPTH_SELECTIONS = ("least_important", "contiguous_block")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def from_fields(cls, values: dict, what: str):
    """``cls(**values)`` for a dataclass ``cls``, a key that is not one of its fields a ValueError
    naming ``what`` and the fields it has."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


@dataclass
class Target:
    """What the pruned model should look like.

    Explicit sizes (any subset; an axis not named keeps its size): ``hidden_size``,
    ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``, and depth as
    ``num_layers`` (which layers: by the scores' ``layer`` axis, as ``depth_selection`` says:
    the least important ones, or the least important contiguous block) or ``drop_layers``
    (these indices). Or a budget, ``target_params``: a count (``70_000_000``, ``"70M"``, ``"1.2B"``)
    or a fraction of the current count (``0.5``); the planner then picks the axes not named
    explicitly, never below ``min_*`` (defaults: ``DEFAULT_MIN_FRACTION`` of the original).
    """

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    num_layers: int | None = None
    drop_layers: list[int] | None = None
    target_params: int | float | str | None = None
    min_hidden_size: int | None = None
    min_intermediate_size: int | None = None
    min_num_attention_heads: int | None = None
    min_num_layers: int | None = None
    multiple_of: int = 64
    depth_selection: str = "least_important"

    @classmethod
    def coerce(cls, target) -> "Target":
        """A ``Target`` from a Target or a dict of its fields (unknown keys are an error)."""
        if isinstance(target, cls):
            return target
        if isinstance(target, dict):
            return from_fields(cls, target, "target")
        raise ValueError(f"target must be a Target, a dict or a PrunePlan, got {type(target).__name__}")


@dataclass
class PrunePlan:
    """The sizes before/after, which layers go (``drop_layers``; None when the scores choose
    them at prune time) and parameter counts by part ({embeddings, attention, mlp, norms,
    lm_head, total}; a tied LM head counts once, under embeddings)."""

    model_type: str
    sizes_before: dict
    sizes_after: dict
    drop_layers: list[int] | None
    params_before: dict
    params_after: dict
    budget: int | None = None
    notes: list[str] = field(default_factory=list)
    depth_selection: str = "least_important"

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The plan as a fixed-width text table."""
        rows = [("axis", "before", "after", "kept")]
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "num_layers"):
            before, after = self.sizes_before[name], self.sizes_after[name]
            rows.append((name, f"{before:,}", f"{after:,}", f"{after / before:.1%}"))
        rows.append(("", "", "", ""))
        for part in self.params_before:
            before, after = self.params_before[part], self.params_after.get(part, 0)
            kept = f"{after / before:.1%}" if before else "-"
            rows.append((f"params.{part}", f"{before:,}", f"{after:,}", kept))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [f"PrunePlan ({self.model_type})"]
        lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                  for row in rows]
        if self.budget is not None:
            lines.append(f"budget: {self.budget:,} parameters")
        if self.drop_layers is not None:
            lines.append(f"drop layers: {self.drop_layers}")
        elif self.sizes_after["num_layers"] < self.sizes_before["num_layers"]:
            which = "the least important contiguous block" if self.depth_selection == "contiguous_block" else \
                "the least important layers"
            lines.append(f"layers to drop: {which}, by the 'layer' scores at prune time")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def pruned_config(config, adapter: DecoderAdapter, sizes: dict, kept_layers: list[int]):
    """A copy of ``config`` rewritten to ``sizes``/``kept_layers`` and validated by
    transformers (rebuilt from its dict, as ``from_pretrained`` will); ValueError if rejected."""
    new_config = copy.deepcopy(config)
    adapter.rewrite_config(new_config, sizes, kept_layers)
    try:
        type(config).from_dict(new_config.to_dict())
    except Exception as error:  # transformers raises several types from its strict validators
        shown = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"transformers rejects the pruned {config.model_type} config ({shown}): {error}") from None
    return new_config


def meta_model(model_class, config):
    """A model of ``config`` on the meta device: shapes without memory (milliseconds)."""
    config = copy.deepcopy(config)
    # A GGUF-loaded config names its quantizer; shapes do not depend on it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        return model_class._from_config(config)


def count_parameters(model, adapter: DecoderAdapter) -> dict:
    """Parameters by part (``PARTS``, as the adapter assigns them; what it does not name is a
    norm); a tied LM head is counted once (under embeddings)."""
    parts = adapter.parameter_parts(model)
    counts = dict.fromkeys(PARTS, 0)
    for parameter in model.parameters():
        counts[parts.get(id(parameter), "norms")] += parameter.numel()
    counts["total"] = sum(counts.values())
    return counts


def parse_param_count(value, current: int) -> int:
    """``target_params`` as an absolute count: ints and counts as is, a fraction in (0, 1] of
    ``current``, strings like ``"70M"``, ``"1.2B"``, ``"500k"``."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", value)
        if not match:
            raise ValueError(f"target_params {value!r} is not a count like '70M', '1.2B' or 70000000")
        return int(float(match.group(1).replace("_", "")) * _SUFFIX[match.group(2).lower()])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"target_params must be a count, a fraction or a string like '70M', got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"target_params must be a positive finite fraction or count, got {value!r}")
    if isinstance(value, float) and value <= 1:
        return int(round(value * current))
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"target_params={value!r}: a fraction must be in (0, 1] and a count a whole number of "
                         "parameters (e.g. '70M' or 70000000)")
    return int(value)


def _check_explicit(target: Target, before: dict) -> dict:
    """Sizes named explicitly, checked against the model; returns them."""
    explicit = {name: getattr(target, name) for name in SIZE_FIELDS if getattr(target, name) is not None}
    for name, value in explicit.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"target {name} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"target {name}={value}: every axis must keep at least one unit")
        if value > before[name]:
            raise ValueError(f"target {name}={value} is larger than the model's {before[name]}; pruning only removes")
    return explicit


def _check_drop_layers(drop_layers, num_layers: int, explicit: dict) -> list[int]:
    if any(isinstance(i, bool) or not isinstance(i, int) for i in drop_layers):
        raise ValueError(f"drop_layers must be layer indices (ints), got {drop_layers!r}")
    bad = [i for i in drop_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"drop_layers {bad} out of range: the model has layers 0..{num_layers - 1}")
    if len(set(drop_layers)) != len(drop_layers):
        raise ValueError(f"drop_layers {drop_layers} repeats a layer")
    if len(drop_layers) == num_layers:
        raise ValueError(f"drop_layers would drop all {num_layers} layers; at least one must remain")
    remaining = num_layers - len(drop_layers)
    if "num_layers" in explicit and explicit["num_layers"] != remaining:
        raise ValueError(f"num_layers={explicit['num_layers']} disagrees with drop_layers, which leaves {remaining}")
    return sorted(drop_layers)


def _check_heads(sizes: dict, before: dict) -> None:
    heads, kv = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    if heads % kv:
        raise ValueError(
            f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}: every KV group "
            "must keep the same number of query heads"
        )
    group_before = before["num_attention_heads"] // before["num_key_value_heads"]
    if heads // kv > group_before:
        raise ValueError(
            f"num_attention_heads={heads} with num_key_value_heads={kv} needs {heads // kv} query heads per KV "
            f"group, but the model's groups have {group_before}; keep more KV groups or fewer query heads"
        )


def _grid(values, multiple_of: int, min_choices: int = 4) -> list[int]:
    """The values (ascending) that are multiples of the coarsest step among multiple_of,
    multiple_of/2, ..., 1 still offering ``min_choices`` sizes below the current one (the last
    of ``values``): hardware-friendly sizes on real models, enough resolution on small ones."""
    current = values[-1]
    step = multiple_of
    while step > 1:
        coarse = [v for v in values if v % step == 0 and v < current]
        if len(coarse) >= min_choices:
            return coarse + [current]
        step //= 2
    return list(values)


def plan(model, target) -> PrunePlan:
    """Dry run of ``prune``: checks ``target`` against ``model`` and returns the plan (sizes,
    parameter counts per part; ``print(plan)`` shows the table). No weight is touched."""
    adapter = get_adapter(model, "slimlm.surgery", "prunes")
    target = Target.coerce(target)
    before = model_sizes(model.config)
    explicit = _check_explicit(target, before)
    if target.depth_selection not in DEPTH_SELECTIONS:
        raise ValueError(f"depth_selection must be one of {', '.join(DEPTH_SELECTIONS)}, "
                         f"got {target.depth_selection!r}")
    drop_layers = None
    if target.drop_layers is not None:
        drop_layers = _check_drop_layers(list(target.drop_layers), before["num_layers"], explicit)
        explicit["num_layers"] = before["num_layers"] - len(drop_layers)
    sizes = {**before, **explicit}
    # An MHA model asked for fewer heads stays MHA (KV heads follow) unless told otherwise.
    if (before["num_key_value_heads"] == before["num_attention_heads"] and "num_attention_heads" in explicit
            and "num_key_value_heads" not in explicit):
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    _check_heads(sizes, before)
    model_class = type(model)
    params_before = count_parameters(meta_model(model_class, model.config), adapter)

    def kept(num_layers):
        if drop_layers is not None:
            return [i for i in range(before["num_layers"]) if i not in drop_layers]
        return list(range(num_layers))

    def params_of(candidate: dict) -> int:
        config = pruned_config(model.config, adapter, candidate, kept(candidate["num_layers"]))
        return count_parameters(meta_model(model_class, config), adapter)["total"]

    budget = None
    notes = []
    if target.target_params is not None:
        budget = parse_param_count(target.target_params, params_before["total"])
        if budget > params_before["total"]:
            raise ValueError(
                f"target_params={target.target_params!r} ({budget:,}) is larger than the model "
                f"({params_before['total']:,} parameters); pruning only removes"
            )
        sizes = _fit_budget(sizes, before, explicit, target, adapter, budget, params_of, notes)
    new_config = pruned_config(model.config, adapter, sizes, kept(sizes["num_layers"]))
    params_after = count_parameters(meta_model(model_class, new_config), adapter)
    return PrunePlan(adapter.model_type, before, sizes, drop_layers, params_before, params_after, budget, notes,
                     target.depth_selection)


def _minimum(axis: str, target: Target, before: dict) -> int:
    stated = getattr(target, f"min_{axis}")
    if stated is not None:
        if stated <= 0:
            raise ValueError(f"min_{axis}={stated} must be at least 1")
        return stated
    return max(1, math.ceil(DEFAULT_MIN_FRACTION[axis] * before[axis]))


def _candidates(axis: str, sizes: dict, before: dict, target: Target, adapter: DecoderAdapter) -> list[int]:
    """Legal values of ``axis`` (ascending) between its minimum and its current size."""
    low, current = _minimum(axis, target, before), sizes[axis]
    if axis == "num_attention_heads":
        kv = sizes["num_key_value_heads"]
        values = [kv * g for g in range(1, current // kv + 1) if kv * g >= low]
        if adapter.hidden_multiple_of_heads:
            values = [v for v in values if sizes["hidden_size"] % v == 0]
        return values or [current]
    if axis == "num_layers":
        return list(range(min(low, current), current + 1))
    values = list(range(min(low, current), current + 1))
    if axis == "hidden_size" and adapter.hidden_multiple_of_heads:
        values = [v for v in values if v % sizes["num_attention_heads"] == 0]
    return _grid(values, target.multiple_of)


def _fit_budget(sizes, before, explicit, target, adapter, budget, params_of, notes) -> dict:
    """Shrink the free axes in BUDGET_ORDER until the count fits ``budget``: each axis goes to
    the largest legal value that fits, or to its minimum and the next axis takes over."""
    sizes = dict(sizes)
    if params_of(sizes) <= budget:
        return sizes
    for axis in BUDGET_ORDER:
        if axis in explicit:
            continue
        values = _candidates(axis, sizes, before, target, adapter)
        if params_of({**sizes, axis: values[0]}) > budget:
            sizes[axis] = values[0]
            notes.append(f"{axis} at its minimum {values[0]}")
            continue
        # Parameter count grows with every axis, so bisect for the largest value that fits.
        low, high = 0, len(values) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if params_of({**sizes, axis: values[middle]}) <= budget:
                low = middle
            else:
                high = middle - 1
        sizes[axis] = values[low]
        return sizes
    reachable = params_of(sizes)
    raise ValueError(
        f"target_params={target.target_params!r} asks for {budget:,} parameters: cannot reach that within the "
        f"per-axis minimums (the smallest model they allow has "
        f"{reachable:,}: {', '.join(f'{k}={v}' for k, v in sizes.items())}); name sizes explicitly (--hidden-size, "
        "--intermediate-size, --num-heads, --num-layers; hidden_size … num_layers in a recipe's target or Target) or "
        "lower the minimums (min_hidden_size, min_intermediate_size, min_num_attention_heads, min_num_layers in a "
        "recipe's target or Target; the command line has no flag for them)"
    )
