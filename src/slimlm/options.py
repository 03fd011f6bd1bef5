"""One declaration per option. An options dataclass (a subclass of ``Options``) declares each
option of a concern once, as a field made with ``option``: its type (the annotation), its
default, its check and its help. From that one declaration come

- the Python API: the dataclass itself, checked in ``__post_init__``;
- the command line: ``add_arguments`` adds one flag per field (``--num-samples`` for
  ``num_samples``), ``from_args`` builds the dataclass from the parsed flags;
- a recipe section: ``from_section`` checks a YAML mapping field by field and builds it;
- a stage's recorded inputs: ``as_record`` (the fields as JSON values).

A check that fails names the option the way its surface spells it: ``--num-samples must be >
0`` on the command line, ``recipe.yaml: importance.num_samples must be > 0`` in a recipe,
``num_samples must be > 0`` in Python — all ``InputError``; so does a problem that names another
option (``OptionError(..., mentions=...)``). A field whose default is ``REQUIRED`` must be given.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import types
import typing

from slimlm.errors import InputError

# Rules a field's ``check`` may name; each returns what is wrong with a value, or None.
RULES = {
    "positive": lambda value: None if value > 0 and math.isfinite(value) else f"must be > 0 and finite, got {value}",
    "non_negative": lambda value: None if value >= 0 and math.isfinite(value) else f"must be >= 0 and finite, got {value}",
    "fraction": lambda value: None if 0 <= value <= 1 else f"must be in [0, 1], got {value}",
    "positive_fraction": lambda value: None if 0 < value <= 1 else f"must be in (0, 1], got {value}",
    "open_fraction": lambda value: None if 0 < value < 1 else f"must be in (0, 1), got {value}",
}


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


# The default of an option that has none: leaving it out is an error ("tokens is required").
REQUIRED = _Required()


def option(default, help: str, *, check: str | None = None, choices=None, renamed=None, cli: bool = True,
           flag: str | None = None):
    """A field of an options dataclass: ``default`` (a list or dict is copied per instance;
    ``REQUIRED``: none, it must be given), ``help`` (the flag's help and the reference's text),
    ``check`` (a ``RULES`` name, applied to a number or to each item of a list; None skips a None
    value), ``choices`` (the values a string, or each item of a list, may take; ``renamed``: old
    spellings → their choice, named in the refusal of an old one: "bf16 is now bfloat16"), ``cli=False``
    for an option a command line cannot sensibly take (it stays in recipes and Python), ``flag``
    for a command line's name of it other than ``--name-with-dashes`` (a flag that predates it;
    for a ``cli=False`` option, what the command gives it from, as its messages name it)."""
    if check is not None and check not in RULES:
        raise ValueError(f"unknown check {check!r} (known: {', '.join(RULES)})")
    metadata = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None, "cli": cli,
                "flag": flag, "renamed": dict(renamed or {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class OptionError(InputError):
    """An option's value that its check refuses: ``name`` and what is wrong (``problem``), in
    which ``{other}`` stands for each option named in ``mentions``, spelled as each surface
    spells it (``--top-n``, ``search.top_n``, ``top_n``)."""

    def __init__(self, name: str, problem: str, *, mentions=()):
        self.name, self.problem, self.mentions = name, problem, tuple(mentions)
        super().__init__(self.said(str))

    def said(self, spell) -> str:
        """The message with each option's name as ``spell(name)`` gives it."""
        problem = self.problem.format(**{name: spell(name) for name in self.mentions}) if self.mentions \
            else self.problem
        return said(spell(self.name), problem)


def said(name: str, problem: str) -> str:
    """'num_samples must be > 0 …', 'metrics: unknown value …' (a problem may start with ':')."""
    return f"{name}{problem}" if problem.startswith(":") else f"{name} {problem}"


@dataclasses.dataclass
class Options:
    """Base of the options dataclasses; ``SECTION`` is the recipe section a subclass is."""

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = "is required" if value is REQUIRED else _problem(field, value)
            if problem:
                raise OptionError(field.name, problem)
        self.check()

    def check(self) -> None:
        """Checks across fields (raise ``OptionError``); none by default."""

    # ------------------------------------------------------------- surfaces
    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def defaults(cls) -> dict:
        """Each field's default (``REQUIRED`` for one that has none), without building the options."""
        return {field.name: field.default_factory() if field.default is dataclasses.MISSING else field.default
                for field in cls.fields()}

    @classmethod
    def flag(cls, name: str) -> str:
        """How the command line names field ``name``: its flag, ``--name-with-dashes`` unless declared."""
        field = next(field for field in cls.fields() if field.name == name)
        return field.metadata.get("flag") or "--" + name.replace("_", "-")

    @classmethod
    def kinds(cls) -> dict[str, tuple[type, ...]]:
        """Each field's accepted types: (int,), (float, NoneType), (list,) …"""
        hints = typing.get_type_hints(cls)
        return {field.name: _kinds(hints[field.name]) for field in cls.fields()}

    @classmethod
    def from_section(cls, section: dict | None, where: str):
        """The options of a recipe section (a mapping; missing fields take their defaults);
        InputError naming ``where`` and ``SECTION.field`` for an unknown field, a value of the
        wrong type or one a check refuses."""
        section = {} if section is None else section
        if not isinstance(section, dict):
            raise InputError(f"{where}: {cls.SECTION}: expected a mapping, got {type(section).__name__}")
        kinds = cls.kinds()
        unknown = sorted(set(section) - set(kinds))
        if unknown:
            raise InputError(f"{where}: unknown field {cls.SECTION + '.' + unknown[0]!r} "
                             f"(known: {', '.join(sorted(kinds))})")
        # null is a field's default (an optional field's None), never a type to name
        values = {name: check_type(f"{where}: {cls.SECTION}.{name}", value,
                                   tuple(kind for kind in kinds[name] if kind is not type(None)))
                  for name, value in section.items() if value is not None}
        try:
            return cls(**values)
        except OptionError as error:
            raise InputError(f"{where}: {error.said(lambda name: f'{cls.SECTION}.{name}')}") from None

    @classmethod
    def add_arguments(cls, parser, *, skip=(), group: str | None = None) -> None:
        """One flag per field (``--name-with-dashes`` or the field's ``flag``), its default and
        help from the field; a bool is ``--flag/--no-flag``, a list takes comma-separated values,
        a string's choices are argparse's, a ``REQUIRED`` field's flag is required."""
        target = parser.add_argument_group(group) if group else parser
        all_kinds, defaults = cls.kinds(), cls.defaults()
        for field in cls.fields():
            if field.name in skip or not field.metadata.get("cli", True):
                continue
            kinds = all_kinds[field.name]
            default = defaults[field.name]
            flag = cls.flag(field.name)
            help_text = field.metadata["help"].replace("%", "%%")  # argparse %-formats help
            if field.metadata.get("choices"):
                help_text += f" (one{' or more' if list in kinds else ''} of: {', '.join(field.metadata['choices'])})"
            if bool in kinds:
                target.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                                    help=help_text)
                continue
            required = default is REQUIRED
            if list in kinds:
                kind = _csv
                help_text += "" if required else f" (comma-separated; default {','.join(map(str, default)) or 'none'})"
            else:
                kind = next(k for k in kinds if k is not type(None))
                help_text += f" (default {default})" if default not in (None, "") and not required else ""
            # (an option with renamed spellings is checked by from_args, which names the new one)
            choices = field.metadata.get("choices") if kind is str and not field.metadata.get("renamed") else None
            target.add_argument(flag, dest=field.name, type=_argument_type(kind), help=help_text, choices=choices,
                                metavar=flag.lstrip("-").replace("-", "_").upper() if kind is not str else None,
                                **({"required": True} if required else {"default": default}))

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides):
        """The options from flags ``add_arguments`` added (fields it skipped from ``overrides``
        or their defaults); InputError naming the flag for a value a check refuses."""
        values = {field.name: getattr(args, field.name) for field in cls.fields() if hasattr(args, field.name)}
        values.update(overrides)
        try:
            return cls(**values)
        except OptionError as error:
            raise InputError(error.said(cls.flag)) from None

    def as_record(self) -> dict:
        """The options as JSON values (lists, not tuples), for a stage's recorded inputs."""
        return {name: copy.deepcopy(value) for name, value in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------ types
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
          dict: "a mapping", type(None): "null"}


def type_name(kinds) -> str:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    return " or ".join(_NAMES[kind] for kind in kinds)


def check_type(where: str, value, kinds):
    """``value`` as one of ``kinds``: an int where a number goes is a float, and a whole float
    where an integer goes (``max_tokens: 2e6``) an int; true/false is never a number."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) and bool not in kinds:
        raise InputError(f"{where}: expected {type_name(kinds)}, got {value!r}")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kinds):
        raise InputError(f"{where}: expected {type_name(kinds)}, got {type(value).__name__} {value!r}")
    return value


def _kinds(hint) -> tuple[type, ...]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return tuple(kind for arg in typing.get_args(hint) for kind in _kinds(arg))
    if origin is not None:
        return (origin,)
    return (hint,)


def _problem(field: dataclasses.Field, value) -> str | None:
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    rule = field.metadata.get("check")
    choices = field.metadata.get("choices")
    for item in items:
        if rule is not None and not isinstance(item, bool) and isinstance(item, (int, float)):
            problem = RULES[rule](item)
            if problem:
                return problem
        if choices is not None and item not in choices:
            new = field.metadata.get("renamed", {}).get(item) if isinstance(item, str) else None
            hint = f"; {item} is now {new}" if new in choices else ""
            return f": unknown value {item!r} (known: {', '.join(map(str, choices))}{hint})"
    return None


def _csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _argument_type(kind):
    """The flag's argparse type: a malformed value (``--lr abc``) is argparse's usage error; a
    well-formed one its check refuses is ``from_args``' one-line error naming the flag."""
    if kind is _csv or kind is str:
        return kind

    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_NAMES[kind]}, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse
