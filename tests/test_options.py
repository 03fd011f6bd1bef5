"""slimlm.options: each option declared once, and the command line, a recipe and Python agree
on it field by field (names, defaults, checks)."""
import dataclasses

import pytest

from slimlm.cli import build_parser
from slimlm.errors import InputError
from slimlm.pipeline.recipe import OPTION_SECTIONS, TOKENIZE_FROM_DATA, validate_recipe

# The command whose flags each options dataclass declares, with the flags it needs besides
# (correct_teacher: none; slimlm distill's --correct-teacher-* flags are its own).
COMMANDS = {"importance": ["importance", "--model", "m", "--data", "d", "--out", "o"],
            "synthetic": ["generate", "--teacher", "t", "--out", "o.jsonl"],
            "distill": ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o"],
            "search": ["search", "--model", "m", "--scores", "s", "--data", "d", "--out", "o"],
            "reconstruct": ["prune", "--model", "m", "--out", "o"],
            "eval": ["eval", "--model", "m"],
            "tokenize": ["tokenize", "--tokenizer", "m", "--data", "d", "--out", "o"],
            "teacher_cache": ["teacher-cache", "--teacher", "t", "--data", "d", "--out", "o"],
            "schedule": ["gradual", "--teacher", "t", "--data", "d", "--target-params", "0.5", "--out", "o"]}
# Fields of a section that a recipe sets in another section (the tokenize stage's text field and
# held-out split come from data and seed): refused in the section, absent from its record.
ELSEWHERE = {"tokenize": TOKENIZE_FROM_DATA}
# Values of the fields that have no default.
GIVEN = {"correct_teacher": {"tokens": 64}}


def minimal_recipe(**sections):
    return {"teacher": "t", "data": {"train": "x.txt"}, "target": {"target_params": 0.5}, **sections}


@pytest.mark.parametrize("options", OPTION_SECTIONS, ids=lambda options: options.SECTION)
def test_the_command_line_a_recipe_and_python_share_every_option_and_default(options):
    given = GIVEN.get(options.SECTION, {})
    defaults = options(**given).as_record()
    assert {name: value for name, value in options.defaults().items() if name not in given} == \
        {name: value for name, value in defaults.items() if name not in given}
    recipe = validate_recipe(minimal_recipe(**{options.SECTION: given}), "r.yaml")
    elsewhere = ELSEWHERE.get(options.SECTION, ())
    assert recipe[options.SECTION] == {name: value for name, value in defaults.items() if name not in elsewhere}
    for name in elsewhere:
        with pytest.raises(InputError, match=f"tokenize.{name} is set by the data section"):
            validate_recipe(minimal_recipe(**{options.SECTION: {name: defaults[name]}}), "r.yaml")
    assert all(field.metadata["help"] for field in options.fields())
    if options.SECTION not in COMMANDS:
        return
    args = build_parser().parse_args(COMMANDS[options.SECTION])
    for field in options.fields():
        if field.metadata["cli"]:
            assert getattr(args, field.name) == defaults[field.name], field.name
    assert options.from_args(args) == options()


@pytest.mark.parametrize("options", OPTION_SECTIONS, ids=lambda options: options.SECTION)
def test_a_refused_value_is_named_the_way_each_surface_spells_it(options):
    given = GIVEN.get(options.SECTION, {})
    positive = next(field.name for field in options.fields() if field.metadata["check"] == "positive")
    with pytest.raises(InputError, match=f"^{positive} must be > 0"):
        options(**{**given, positive: 0})
    with pytest.raises(InputError, match=f"^r.yaml: {options.SECTION}.{positive} must be > 0"):
        validate_recipe(minimal_recipe(**{options.SECTION: {**given, positive: 0}}), "r.yaml")
    with pytest.raises(InputError, match=f"r.yaml: unknown field '{options.SECTION}.bogus'"):
        validate_recipe(minimal_recipe(**{options.SECTION: {**given, "bogus": 1}}), "r.yaml")
    if options.SECTION not in COMMANDS:
        return
    flag = options.flag(positive)
    args = build_parser().parse_args([*COMMANDS[options.SECTION], flag, "0"])
    with pytest.raises(InputError, match=f"^{flag} must be > 0"):
        options.from_args(args)


def test_lists_choices_and_cross_field_checks():
    from slimlm.importance.options import ImportanceOptions

    args = build_parser().parse_args([*COMMANDS["importance"], "--metrics", "wanda,magnitude", "--depth", ""])
    assert ImportanceOptions.from_args(args) == ImportanceOptions(metrics=["wanda", "magnitude"], depth=[])
    with pytest.raises(InputError, match="^--metrics: unknown value 'bogus'"):
        ImportanceOptions.from_args(build_parser().parse_args([*COMMANDS["importance"], "--metrics", "bogus"]))
    with pytest.raises(InputError, match="metrics and depth are both empty"):
        ImportanceOptions(metrics=[], depth=[])
    assert dataclasses.replace(ImportanceOptions(), num_samples=8).num_samples == 8


def test_a_required_option_must_be_given_on_every_surface(capsys):
    import argparse

    from slimlm.pipeline.correct import CorrectionOptions

    with pytest.raises(InputError, match="^tokens is required$"):
        CorrectionOptions()
    for section in ({}, {"lr": 0.1}, {"tokens": None}):
        with pytest.raises(InputError, match="^r.yaml: correct_teacher.tokens is required$"):
            validate_recipe(minimal_recipe(correct_teacher=section), "r.yaml")
    parser = argparse.ArgumentParser()
    CorrectionOptions.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "the following arguments are required: --tokens" in capsys.readouterr().err
    assert CorrectionOptions.from_args(parser.parse_args(["--tokens", "64"])) == CorrectionOptions(tokens=64)
    assert CorrectionOptions.defaults()["lr"] is None


def test_a_problem_naming_another_option_spells_it_as_each_surface_does():
    from slimlm.search import SearchOptions

    with pytest.raises(InputError, match="^top_k 5 is larger than top_n 3"):
        SearchOptions(top_n=3, top_k=5)
    with pytest.raises(InputError, match="^r.yaml: search.top_k 5 is larger than search.top_n 3"):
        validate_recipe(minimal_recipe(search={"top_n": 3, "top_k": 5}), "r.yaml")
    args = build_parser().parse_args([*COMMANDS["search"], "--top-n", "3", "--top-k", "5"])
    with pytest.raises(InputError, match="^--top-k 5 is larger than --top-n 3"):
        SearchOptions.from_args(args)


def test_the_search_space_flags_are_the_recipes_space_mapping():
    from slimlm.cli.search import search_options
    from slimlm.search import SearchOptions, SearchSpace

    args = build_parser().parse_args(COMMANDS["search"])
    assert search_options(args).search_space() == SearchOptions().search_space() == SearchSpace()
    args = build_parser().parse_args([*COMMANDS["search"], "--max-width-prune", "0.5", "--multiple-of", "16",
                                      "--depth-selection", "both"])
    space = {"max_width_prune": 0.5, "multiple_of": 16, "depth_selections": ["least_important", "contiguous_block"]}
    recipe = validate_recipe(minimal_recipe(search={"space": space}), "r.yaml")
    assert search_options(args).search_space() == SearchSpace.coerce(recipe["search"]["space"])
    args = build_parser().parse_args([*COMMANDS["search"], "--max-width-prune", "1.5"])
    with pytest.raises(InputError, match=r"^search space: max_width_prune must be in \[0, 1\)"):
        search_options(args)
    with pytest.raises(InputError, match=r"^r.yaml: search.space: max_width_prune must be in \[0, 1\)"):
        validate_recipe(minimal_recipe(search={"space": {"max_width_prune": 1.5}}), "r.yaml")
    with pytest.raises(InputError, match="^r.yaml: search.held_out: a fraction in \\(0, 1\\) or a whole block count"):
        validate_recipe(minimal_recipe(search={"held_out": 2.5}), "r.yaml")


def test_eval_flags_keep_their_names_and_prompts_repeat():
    from slimlm.cli.eval import eval_options
    from slimlm.evaluate import EvalOptions

    args = build_parser().parse_args([*COMMANDS["eval"], "--prompt", "a, b", "--prompt", "c", "--speed",
                                      "--prompt-tokens", "8", "--new-tokens", "3", "--rounds", "1"])
    assert eval_options(args) == EvalOptions(prompts=["a, b", "c"], speed=True, speed_prompt_tokens=8,
                                             speed_new_tokens=3, speed_rounds=1)
    assert eval_options(build_parser().parse_args(COMMANDS["eval"])) == EvalOptions()
    with pytest.raises(InputError, match="^--new-tokens must be >= 2, got 1"):
        eval_options(build_parser().parse_args([*COMMANDS["eval"], "--new-tokens", "1"]))
    with pytest.raises(InputError, match="^r.yaml: eval.speed_new_tokens must be >= 2, got 1"):
        validate_recipe(minimal_recipe(eval={"speed_new_tokens": 1}), "r.yaml")
    with pytest.raises(InputError, match="^r.yaml: eval.prompts must be a list of strings"):
        validate_recipe(minimal_recipe(eval={"prompts": ["a", 1]}), "r.yaml")
    assert validate_recipe(minimal_recipe(eval=None), "r.yaml")["eval"] == EvalOptions().as_record()


def test_absent_optional_sections_stay_none():
    recipe = validate_recipe(minimal_recipe(), "r.yaml")
    assert [recipe[name] for name in ("search", "reconstruct", "correct_teacher", "synthetic")] == [None] * 4
