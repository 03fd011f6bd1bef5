"""What a searched student must fit in (``Budget``: parameters, or memory = weights in the
save dtype + KV cache at a stated batch × sequence length) and which shapes of the search
space meet it (``fitting``)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from slimlm.models import DTYPES
from slimlm.search.candidates import Candidate
from slimlm.surgery.planning import Target, from_fields, parse_param_count

_MEMORY_SUFFIX = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "kib": 2**10,
                  "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def parse_memory(value) -> int:
    """A byte count from an int or a string like ``"1.5GiB"`` (binary), ``"800MB"`` (decimal),
    ``"2G"`` (binary, as ``--target-memory 2G`` is usually meant)."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _MEMORY_SUFFIX:
            raise ValueError(f"target_memory {value!r} is not a size like '1.5GiB', '800MB' or 2000000000")
        return int(float(match.group(1).replace("_", "")) * _MEMORY_SUFFIX[match.group(2).lower()])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"target_memory must be a positive byte count or a string like '1.5GiB', got {value!r}")
    return int(value)


def resolve_dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (or a torch.dtype), got {dtype!r}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class Budget:
    """What the student must fit in: ``target_params`` (a count, ``"70M"``, or a fraction of
    the model, as ``Target``'s), or ``target_memory`` (bytes or ``"1.5GiB"``): weights in
    ``dtype`` (default: the model's) plus the KV cache at ``at_batch`` × ``at_seq`` tokens.
    A shape meets it when its size is at most the budget and at least (1 − tolerance) of it."""

    target_params: int | float | str | None = None
    target_memory: int | float | str | None = None
    at_batch: int | None = None
    at_seq: int | None = None
    dtype: str | torch.dtype | None = None
    tolerance: float = 0.1

    @classmethod
    def coerce(cls, value) -> "Budget":
        """A Budget from a Budget, a ``Target`` (its ``target_params``) or a dict of fields."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Target):
            named = [f.name for f in fields(Target) if f.name not in ("target_params", "multiple_of", "depth_selection")
                     and getattr(value, f.name) is not None]
            if value.target_params is None or named:
                raise ValueError("search takes a Target only as a budget (target_params, nothing else named; got "
                                 f"{', '.join(named) or 'no target_params'}): it chooses the sizes itself")
            return cls(target_params=value.target_params)
        if isinstance(value, dict):
            return from_fields(cls, value, "search target")
        raise ValueError(f"target must be a Budget, a Target or a dict, got {type(value).__name__}")

    def check(self) -> None:
        if (self.target_params is None) == (self.target_memory is None):
            raise ValueError("give exactly one of target_params and target_memory")
        if self.target_memory is not None:
            parse_memory(self.target_memory)
            for name in ("at_batch", "at_seq"):
                value = getattr(self, name)
                if value is None:
                    raise ValueError(f"target_memory needs at_batch and at_seq (the KV cache is part of the memory "
                                     f"budget): {name} is missing")
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.tolerance, (int, float)) and 0 < self.tolerance <= 1):
            raise ValueError(f"tolerance must be in (0, 1], got {self.tolerance!r}")

    @property
    def metric(self) -> str:
        return "memory_bytes" if self.target_memory is not None else "params"


def fitting(shapes: list[Candidate], budget: Budget, model_size: int) -> tuple[int, list[Candidate]]:
    """(budget in params or bytes, the shapes that meet it, closest first); ValueError naming the
    smallest reachable size when none can, or the largest under the budget when the tolerance
    leaves none."""
    metric = budget.metric
    if metric == "params":
        limit = parse_param_count(budget.target_params, model_size)
        what, shown = "parameters", budget.target_params
    else:
        limit = parse_memory(budget.target_memory)
        what, shown = f"bytes at batch {budget.at_batch} x seq {budget.at_seq}", budget.target_memory
    size = {id(shape): getattr(shape, metric) for shape in shapes}
    smallest = min(shapes, key=lambda shape: size[id(shape)])
    if size[id(smallest)] > limit:
        raise ValueError(
            f"no legal shape meets the budget {shown!r} ({limit:,} {what}): the smallest the search space allows is "
            f"{size[id(smallest)]:,} ({smallest.key}); raise --max-width-prune/--max-depth-prune "
            "(search.space.max_width_prune/max_depth_prune in a recipe, SearchSpace in Python) or lower "
            "search.space.min_sizes")
    largest = max(shapes, key=lambda shape: size[id(shape)])
    if size[id(largest)] <= limit:
        raise ValueError(f"the unpruned model ({size[id(largest)]:,} {what}) already meets the budget {shown!r} "
                         f"({limit:,}): there is nothing to prune")
    under = [shape for shape in shapes if size[id(shape)] <= limit]
    meeting = [shape for shape in under if size[id(shape)] >= (1 - budget.tolerance) * limit]
    if not meeting:
        largest = max(under, key=lambda shape: size[id(shape)])
        raise ValueError(
            f"no legal shape is within tolerance {budget.tolerance} of the budget {shown!r} ({limit:,} {what}): the "
            f"largest under it is {size[id(largest)]:,} ({largest.key}); raise --tolerance (target.tolerance in a "
            "recipe) or lower --multiple-of (search.space.multiple_of)")
    meeting.sort(key=lambda shape: (limit - size[id(shape)], shape.key))
    return limit, meeting
