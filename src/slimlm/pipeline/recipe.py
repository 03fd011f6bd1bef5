"""A recipe: the YAML file that says what ``slimlm run`` does, checked field by field (the
options dataclasses of ``OPTION_SECTIONS``, and ``RECIPE_FIELDS``: each other field's type and
default) before any work starts; an error names the file and the field. The demo's recipes (``demo.yaml``, ``demo-quick.yaml``) ship in ``slimlm.demo``.

Every recipe is parsed by ``RecipeLoader`` (``read_yaml``): YAML's safe subset without aliases
(``*name``), so that a few lines cannot expand to gigabytes, and with YAML 1.2's numbers
(``1e-4``, ``1E3``, ``.5`` are numbers, not strings)."""
from __future__ import annotations

import copy
import os
import re

import yaml

from slimlm.distill.options import DistillOptions, GenerationOptions, TeacherCacheOptions
from slimlm.errors import InputError
from slimlm.evaluate import EvalOptions
from slimlm.importance.options import ImportanceOptions
from slimlm.shards import TokenizeOptions
from slimlm.options import check_type
from slimlm.pipeline.correct import CorrectionOptions
from slimlm.search.options import SearchOptions
from slimlm.search.schedule import ScheduleOptions
from slimlm.surgery.options import ReconstructOptions


class _AliasRefused(yaml.YAMLError):
    def __init__(self, event):
        super().__init__(f"*{event.anchor}")
        self.anchor = event.anchor
        self.line = event.start_mark.line + 1


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses an alias where it meets one, while composing, before any
    value is built (``*a`` repeated a few times per level of nesting is the "billion laughs"),
    and that reads the floats YAML 1.2 writes: an exponent with or without a sign or a point
    (``1e-4``, ``5E3``, ``1.5e3``) and a fraction without a leading digit (``-.5``)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise _AliasRefused(self.peek_event())
        return super().compose_node(parent, index)


YAML_1_2_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$")
# Tried after YAML 1.1's int and float rules, so 1_000 and 0x10 stay ints and 1.5 a float as before.
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_1_2_FLOAT, list("-+0123456789."))


class RecipeDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that quotes the strings ``RecipeLoader`` would read as numbers ('1e5')."""


RecipeDumper.add_implicit_resolver("tag:yaml.org,2002:float", YAML_1_2_FLOAT, list("-+0123456789."))


def read_yaml(stream, where: str):
    """The YAML document of ``stream`` (text or an open file) read by ``RecipeLoader``; an
    InputError naming ``where`` (e.g. ``recipe path.yaml``) when it is not valid YAML or holds an
    alias."""
    try:
        return yaml.load(stream, Loader=RecipeLoader)
    except _AliasRefused as error:
        raise InputError(f"{where}: YAML aliases (*{error.anchor}) are not allowed (line {error.line}); "
                         "write the value out") from None
    except yaml.YAMLError as error:
        raise InputError(f"{where}: not valid YAML ({' '.join(str(error).split())})") from None


def dump_yaml(value) -> str:
    """``value`` as YAML that ``read_yaml`` reads back equal (a run's copy of its recipe)."""
    return yaml.dump(value, Dumper=RecipeDumper, sort_keys=False)


_ANY = object()
# The sections that are an options dataclass (``slimlm.options``): declared there once, for the
# command line, recipes and Python alike. With a search section, ``target`` is the search's
# budget (slimlm.Budget's fields); reconstruct refits the pruned o_proj/down_proj on the first
# num_samples blocks of importance.seq_len tokens of the training text, for the search's
# candidates and the prune stage both; correct_teacher is Minitron's teacher correction.
OPTION_SECTIONS = (TokenizeOptions, ImportanceOptions, GenerationOptions, DistillOptions, SearchOptions,
                   ReconstructOptions, CorrectionOptions, EvalOptions, TeacherCacheOptions, ScheduleOptions)
# TokenizeOptions' fields a recipe sets elsewhere: the data section's text field and held-out
# split (by document, with the recipe's seed), which the tokenize stage passes on.
TOKENIZE_FROM_DATA = ("text_field", "documents", "heldout_fraction", "seed")
# The other sections: section → field → (expected type(s), default). None as default: optional.
RECIPE_FIELDS = {
    None: {"teacher": (str, _ANY), "out": (str, None), "seed": (int, 0), "dtype": (str, "auto"),
           "save_dtype": (str, "auto"),
           "device": (str, None), "data": (dict, _ANY), "tokenize": (dict, {}), "importance": (dict, {}),
           "target": (dict, _ANY), "teacher_cache": ((dict, type(None)), None),
           "search": ((dict, type(None)), None), "schedule": ((dict, type(None)), None),
           "reconstruct": ((dict, type(None)), None), "correct_teacher": ((dict, type(None)), None), "synthetic": ((dict, type(None)), None), "distill": (dict, {}), "eval": (dict, {}), "report": (dict, {})},
    # general: held-out sets of other registers than the training text, evaluated and reported
    # beside heldout: one set (named "general") or a mapping {split name: paths} (the demo's:
    # general = Python's language reference and the common licences, english = general English prose).
    "data": {"train": ((str, list), _ANY), "heldout": ((str, list), None), "general": ((str, list, dict), None),
             "heldout_fraction": (float, 0.1),
             "text_field": (str, "text")},
    "report": {"title": (str, "slimlm report")},
}


def _check_section(name: str, section: dict, fields: dict, where: str) -> dict:
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown field {'.'.join(filter(None, (name, unknown[0])))!r} "
                         f"(known: {', '.join(sorted(fields))})")
    checked = {}
    for field, (kind, default) in fields.items():
        label = f"{where}: {'.'.join(filter(None, (name, field)))}"
        if field not in section or section[field] is None and default is not _ANY:
            if default is _ANY:
                raise InputError(f"{label} is required")
            checked[field] = copy.deepcopy(default)
            continue
        checked[field] = check_type(label, section[field], kind)
    return checked


def validate_recipe(raw, where: str) -> dict:
    """The recipe with every default filled in; InputError naming ``where`` and the field otherwise."""
    if not isinstance(raw, dict):
        raise InputError(f"{where}: a recipe is a YAML mapping, got {type(raw).__name__}")
    recipe = _check_section(None, raw, RECIPE_FIELDS[None], where)
    given = raw.get("tokenize") if isinstance(raw.get("tokenize"), dict) else {}
    for name in TOKENIZE_FROM_DATA:
        if name in given:
            raise InputError(f"{where}: tokenize.{name} is set by the data section (data.text_field, "
                             "data.heldout_fraction) and seed")
    for options in OPTION_SECTIONS:  # an optional section (synthetic: null, or absent) stays None
        if recipe[options.SECTION] is not None:
            recipe[options.SECTION] = options.from_section(recipe[options.SECTION], where).as_record()
    for name in TOKENIZE_FROM_DATA:  # (the tokenize stage takes them from data and seed)
        del recipe["tokenize"][name]
    for section in ("data", "report"):
        recipe[section] = _check_section(section, recipe[section], RECIPE_FIELDS[section], where)
    _check_semantics(recipe, where)
    return recipe


def _check_semantics(recipe: dict, where: str) -> None:
    from slimlm.models import DTYPE_NAMES, DTYPES, unknown_value
    from slimlm.search import Budget
    from slimlm.surgery import Target

    from slimlm.surgery.planning import parse_param_count

    try:
        if recipe["search"] is not None:
            budget = Budget.coerce(recipe["target"])
            budget.check()
        else:
            budget = Target.coerce(recipe["target"])
        if budget.target_params is not None:
            parse_param_count(budget.target_params, 1)  # finite, positive, a fraction or a whole count
    except (ValueError, TypeError) as error:
        raise InputError(f"{where}: target: {error}") from None
    recipe["data"]["general"] = _general_sets(recipe["data"]["general"], where)
    if not 0.0 < recipe["data"]["heldout_fraction"] < 1.0:
        raise InputError(f"{where}: data.heldout_fraction must be in (0, 1), got {recipe['data']['heldout_fraction']}")
    for field in ("dtype", "save_dtype"):
        if recipe[field] != "auto" and recipe[field] not in DTYPES:
            raise InputError(f"{where}: {field}{unknown_value(recipe[field], ('auto', *DTYPE_NAMES))}")


_SPLIT_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def _general_sets(value, where: str) -> dict | None:
    """data.general as {split name: paths} (one set given bare is named "general"); None without it."""
    if value is None:
        return None
    sets = value if isinstance(value, dict) else {"general": value}
    for name, paths in sets.items():
        if not isinstance(name, str) or not _SPLIT_NAME.fullmatch(name) or name in ("train", "heldout"):
            raise InputError(f"{where}: data.general: split name {name!r} must be lowercase letters, digits, '_' "
                             "or '-' (and not train or heldout)")
        check_type(f"{where}: data.general.{name}", paths, (str, list))
    return sets or None


def general_sets(recipe: dict) -> dict:
    """{split name: paths} of the recipe's general held-out sets ({} without data.general)."""
    return recipe["data"]["general"] or {}


def load_recipe(path: str | os.PathLike) -> dict:
    """Read (``read_yaml``) and validate a recipe file; relative paths in it are taken
    relative to the recipe's folder, and ``out`` defaults to ``<name>-run`` beside it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"recipe {path} does not exist")
    with open(path, encoding="utf-8") as handle:
        raw = read_yaml(handle, f"recipe {path}")
    recipe = validate_recipe(raw, path)
    base = os.path.dirname(os.path.abspath(path))

    def local(value):
        if isinstance(value, list):
            return [local(item) for item in value]
        return value if os.path.isabs(value) else os.path.join(base, value)

    if os.path.exists(local(recipe["teacher"])):
        recipe["teacher"] = local(recipe["teacher"])
    for key in ("train", "heldout"):
        if recipe["data"][key] is not None:
            recipe["data"][key] = local(recipe["data"][key])
    for name, paths in general_sets(recipe).items():
        recipe["data"]["general"][name] = local(paths)
    stem = os.path.splitext(os.path.basename(path))[0]
    recipe["out"] = local(recipe["out"]) if recipe["out"] else os.path.join(base, f"{stem}-run")
    return recipe
