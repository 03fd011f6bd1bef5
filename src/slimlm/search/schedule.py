"""A gradual schedule: reach the final budget in ``steps`` cuts, each followed by distillation
(``slimlm.pipeline.gradual`` runs it). Declared once (``slimlm.options``): ``slimlm gradual``'s
flags, a recipe's ``schedule:`` section and ``ScheduleOptions`` in Python.

The pure parts live here: the parameter budget of each step (``step_budgets``), each step's
share of the distillation tokens (``split_tokens``), the rule that a step never grows a
dimension (``check_not_grown``) and the hidden-state layer map of a student cut several times
(``compose_layer_maps``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from slimlm.errors import InputError
from slimlm.options import OptionError, Options, option

TOKEN_RULES = ("even", "back", "front")
BUDGET_RULES = ("geometric",)
# The dimensions a step may only keep or shrink (query heads per KV group among them: a cut
# keeps whole groups of the same size, so a group can never widen again).
DIMENSIONS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "heads_per_group",
              "num_layers")
# How close to 1 explicit fractions must sum (they are written in decimal).
FRACTION_SUM_TOLERANCE = 1e-6


@dataclass
class ScheduleOptions(Options):
    """How a target is reached in steps: ``steps`` cuts (each followed by distillation); the
    distillation tokens split between them by ``token_split`` (``even``, ``back``: step k gets a
    share proportional to k, ``front``: to steps + 1 - k, or one fraction per step); each step's
    parameter budget by ``step_budgets`` (``geometric``: the same ratio every step, or one fraction
    of the teacher's parameters per step, decreasing, the last the final target); with ``rescore``
    each intermediate student is scored on its own activations, else the teacher's scores of the
    units it kept are carried over."""

    SECTION = "schedule"

    steps: int = option(2, "cuts to reach the target, each followed by distillation (at least 2)", check="positive")
    token_split: str | list = option(["even"], "how the distillation tokens are split between the steps: even, back "
                                               "(more to later steps), front, or one fraction per step summing to 1")
    step_budgets: str | list = option(["geometric"], "each step's parameter budget: geometric (the same ratio each "
                                                     "step) or one fraction of the teacher per step, decreasing, the "
                                                     "last the final target")
    rescore: bool = option(True, "score each intermediate student on its own activations (else carry the teacher's "
                                 "scores of the units it kept)")

    def check(self) -> None:
        if self.steps < 2:
            raise OptionError("steps", f"must be >= 2 (one step is the one-shot pipeline), got {self.steps}")
        tokens = rule_or_fractions("token_split", self.token_split, TOKEN_RULES)
        if not isinstance(tokens, str):
            self._check_length("token_split", tokens)
            if any(share <= 0 for share in tokens):
                raise OptionError("token_split", f"gives a step no tokens ({_shown(tokens)}): every step distills")
            if abs(sum(tokens) - 1) > FRACTION_SUM_TOLERANCE:
                raise OptionError("token_split", f"fractions sum to {sum(tokens):g}, not 1 ({_shown(tokens)})")
        budgets = rule_or_fractions("step_budgets", self.step_budgets, BUDGET_RULES)
        if not isinstance(budgets, str):
            self._check_length("step_budgets", budgets)
            if not all(0 < fraction < 1 for fraction in budgets):
                raise OptionError("step_budgets", f"fractions must be in (0, 1) of the teacher, got {_shown(budgets)}")
            if any(later >= earlier for earlier, later in zip(budgets, budgets[1:])):
                raise OptionError("step_budgets", f"must decrease strictly (a step never grows), got {_shown(budgets)}")

    def _check_length(self, name: str, fractions: list[float]) -> None:
        if len(fractions) != self.steps:
            raise OptionError(name, f"gives {len(fractions)} fractions for {{steps}} {self.steps}", mentions=("steps",))

    def token_rule(self) -> str | list[float]:
        """``token_split`` as a rule name or the fractions (``split_tokens``' ``rule``)."""
        return rule_or_fractions("token_split", self.token_split, TOKEN_RULES)

    def budget_rule(self) -> str | list[float]:
        """``step_budgets`` as a rule name or the fractions (``step_budgets``' ``rule``)."""
        return rule_or_fractions("step_budgets", self.step_budgets, BUDGET_RULES)


def rule_or_fractions(name: str, value, rules: tuple[str, ...]) -> str | list[float]:
    """A schedule field as given (a rule's name, a one-item list of it as the command line's
    comma-separated value gives, or fractions as numbers or numeric strings): the rule's name or
    the fractions; OptionError naming ``name`` otherwise."""
    items = [value] if isinstance(value, str) else list(value)
    if len(items) == 1 and isinstance(items[0], str) and items[0] in rules:
        return items[0]
    fractions = []
    for item in items:
        try:
            fraction = float(item) if not isinstance(item, bool) else math.nan
        except (TypeError, ValueError):
            fraction = math.nan
        if not math.isfinite(fraction):
            raise OptionError(name, f": {item!r} is neither a rule ({', '.join(rules)}) nor a fraction")
        fractions.append(fraction)
    if not fractions:
        raise OptionError(name, f": give a rule ({', '.join(rules)}) or one fraction per step")
    return fractions


def _shown(fractions) -> str:
    return ", ".join(f"{fraction:g}" for fraction in fractions)


def step_budgets(teacher_params: int, final_params: int, steps: int, rule="geometric") -> list[int]:
    """The parameter budget of each step, the last exactly ``final_params``: ``geometric`` gives
    step k (1-based) round(T · (F / T)^(k / steps)); a list gives round(fraction · T) per step,
    its last fraction the final target's (within one part in a thousand). InputError for a
    final budget that is not below the teacher, a list of another length, one that does not
    decrease strictly or whose last is not the final target."""
    if not 0 < final_params < teacher_params:
        raise InputError(f"schedule: the final budget {final_params:,} must be below the teacher's {teacher_params:,} "
                         "parameters")
    if rule == "geometric":
        ratio = final_params / teacher_params
        budgets = [round(teacher_params * ratio ** (k / steps)) for k in range(1, steps)] + [final_params]
    elif isinstance(rule, str):
        raise InputError(f"schedule.step_budgets: unknown rule {rule!r} (known: {', '.join(BUDGET_RULES)})")
    else:
        if len(rule) != steps:
            raise InputError(f"schedule.step_budgets gives {len(rule)} fractions for {steps} steps")
        last = rule[-1] * teacher_params
        if abs(last - final_params) > 1e-3 * final_params:
            raise InputError(f"schedule.step_budgets: the last step's budget {rule[-1]:g} of the teacher "
                             f"({round(last):,} parameters) is not the final target ({final_params:,} parameters, "
                             f"{final_params / teacher_params:.4g} of the teacher)")
        budgets = [round(fraction * teacher_params) for fraction in rule[:-1]] + [final_params]
    if any(later >= earlier for earlier, later in zip([teacher_params, *budgets], budgets)):
        raise InputError(f"schedule: the step budgets {', '.join(f'{b:,}' for b in budgets)} do not decrease strictly "
                         f"from the teacher's {teacher_params:,} parameters: a step never grows")
    return budgets


def split_tokens(total: int, steps: int, rule="even") -> list[int]:
    """Each step's share of ``total`` distillation tokens, summing to ``total`` exactly: by
    weights 1 each (``even``), k for step k (``back``), steps + 1 - k (``front``), or the given
    fractions; share k = round(total · W_k) - round(total · W_{k-1}) with W_k the cumulative
    weight fraction. InputError when a step would get no token."""
    if isinstance(rule, str):
        if rule not in TOKEN_RULES:
            raise InputError(f"schedule.token_split: unknown rule {rule!r} (known: {', '.join(TOKEN_RULES)})")
        weights = {"even": [1.0] * steps, "back": [float(k) for k in range(1, steps + 1)],
                   "front": [float(steps + 1 - k) for k in range(1, steps + 1)]}[rule]
    else:
        if len(rule) != steps:
            raise InputError(f"schedule.token_split gives {len(rule)} fractions for {steps} steps")
        weights = [float(fraction) for fraction in rule]
    if any(weight <= 0 for weight in weights):
        raise InputError(f"schedule.token_split gives a step no tokens ({_shown(weights)})")
    cumulative, bounds = 0.0, [0]
    for weight in weights:
        cumulative += weight
        bounds.append(round(total * cumulative / sum(weights)))
    shares = [high - low for low, high in zip(bounds, bounds[1:])]
    for step, share in enumerate(shares, 1):
        if share < 1:
            raise InputError(f"schedule: step {step} of {steps} gets 0 of the {total:,} distillation tokens; give more "
                             "tokens (distill.max_tokens) or fewer steps")
    return shares


def shape_of(sizes: dict) -> dict:
    """The ``DIMENSIONS`` of a shape given by its sizes (``hidden_size`` … ``num_layers``)."""
    shape = {name: int(sizes[name]) for name in DIMENSIONS if name != "heads_per_group"}
    shape["heads_per_group"] = shape["num_attention_heads"] // shape["num_key_value_heads"]
    return shape


def check_not_grown(previous_shape: dict, next_shape: dict, step: int | None = None) -> None:
    """InputError when ``next_shape`` is larger than ``previous_shape`` in any of ``DIMENSIONS``
    (shapes as ``shape_of`` gives them, or sizes it can read): a step only keeps or cuts."""
    before, after = shape_of(previous_shape), shape_of(next_shape)
    grown = [name for name in DIMENSIONS if after[name] > before[name]]
    if grown:
        which = f"step {step}" if step is not None else "a step"
        changes = ", ".join(f"{name} {before[name]} -> {after[name]}" for name in grown)
        raise InputError(f"schedule: {which} would grow {changes}; a step never grows a dimension")


def compose_layer_maps(first: dict[int, int], second: dict[int, int]) -> dict[int, int]:
    """The map of two cuts in a row: ``second`` maps the student's layers onto the intermediate
    model's, ``first`` the intermediate's onto the teacher's (indices into ``hidden_states``, as
    ``slimlm.losses.depth_layer_map`` gives them), so student layer s maps to first[second[s]].
    ValueError when ``second`` names a layer ``first`` does not map."""
    missing = sorted(middle for middle in second.values() if middle not in first)
    if missing:
        raise ValueError(f"the second map names intermediate layers {missing} that the first does not map "
                         f"(it maps {sorted(first)})")
    return {student: first[middle] for student, middle in sorted(second.items())}
