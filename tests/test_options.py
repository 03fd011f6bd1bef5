"""slimlm.options: each option declared once, and the command line, a recipe and Python agree
on it field by field (names, defaults, checks)."""
import dataclasses

import pytest

from slimlm.cli import build_parser
from slimlm.errors import InputError
from slimlm.pipeline.recipe import OPTION_SECTIONS, validate_recipe

# The command whose flags each options dataclass declares, with the flags it needs besides.
COMMANDS = {"importance": ["importance", "--model", "m", "--data", "d", "--out", "o"],
            "synthetic": ["generate", "--teacher", "t", "--out", "o.jsonl"],
            "distill": ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o"]}


def minimal_recipe(**sections):
    return {"teacher": "t", "data": {"train": "x.txt"}, "target": {"target_params": 0.5}, **sections}


@pytest.mark.parametrize("options", OPTION_SECTIONS, ids=lambda options: options.SECTION)
def test_the_command_line_a_recipe_and_python_share_every_option_and_default(options):
    defaults = options().as_record()
    args = build_parser().parse_args(COMMANDS[options.SECTION])
    for field in options.fields():
        if field.metadata["cli"]:
            assert getattr(args, field.name) == defaults[field.name], field.name
    assert options.from_args(args) == options()
    recipe = validate_recipe(minimal_recipe(**{options.SECTION: {}}), "r.yaml")
    assert recipe[options.SECTION] == defaults
    assert all(field.metadata["help"] for field in options.fields())


@pytest.mark.parametrize("options", OPTION_SECTIONS, ids=lambda options: options.SECTION)
def test_a_refused_value_is_named_the_way_each_surface_spells_it(options):
    positive = next(field.name for field in options.fields() if field.metadata["check"] == "positive")
    flag = "--" + positive.replace("_", "-")
    with pytest.raises(InputError, match=f"^{positive} must be > 0"):
        options(**{positive: 0})
    args = build_parser().parse_args([*COMMANDS[options.SECTION], flag, "0"])
    with pytest.raises(InputError, match=f"^{flag} must be > 0"):
        options.from_args(args)
    with pytest.raises(InputError, match=f"^r.yaml: {options.SECTION}.{positive} must be > 0"):
        validate_recipe(minimal_recipe(**{options.SECTION: {positive: 0}}), "r.yaml")
    with pytest.raises(InputError, match=f"r.yaml: unknown field '{options.SECTION}.bogus'"):
        validate_recipe(minimal_recipe(**{options.SECTION: {"bogus": 1}}), "r.yaml")


def test_lists_choices_and_cross_field_checks():
    from slimlm.importance.options import ImportanceOptions

    args = build_parser().parse_args([*COMMANDS["importance"], "--metrics", "wanda,magnitude", "--depth", ""])
    assert ImportanceOptions.from_args(args) == ImportanceOptions(metrics=["wanda", "magnitude"], depth=[])
    with pytest.raises(InputError, match="^--metrics: unknown value 'bogus'"):
        ImportanceOptions.from_args(build_parser().parse_args([*COMMANDS["importance"], "--metrics", "bogus"]))
    with pytest.raises(InputError, match="metrics and depth are both empty"):
        ImportanceOptions(metrics=[], depth=[])
    assert dataclasses.replace(ImportanceOptions(), num_samples=8).num_samples == 8
