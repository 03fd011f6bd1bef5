"""The recipes that ship with slimlm validate: the example in examples/ and the demo's two, with
every field the README documents (a recipe field renamed without its example fails here)."""
import os

import pytest

from slimlm.errors import InputError

from slimlm.demo import builtin_recipe
from slimlm.pipeline import load_recipe, validate_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_example_recipe_validates_and_searches():
    recipe = load_recipe(os.path.join(ROOT, "examples", "recipe.yaml"))
    assert recipe["search"]["top_k"] <= recipe["search"]["top_n"]
    assert recipe["distill"]["teacher_precision"] == "auto"
    assert recipe["data"]["general"] is None  # commented out: optional


@pytest.mark.parametrize("name", ["demo", "demo-quick"])
def test_the_demo_recipes_validate_and_search(name):
    raw = builtin_recipe(name)
    assert set(raw.pop("corpus")) == {"train_chars", "heldout_chars", "general_chars", "english_chars"}
    raw.update(teacher="teacher", out="out", data={"train": "train.jsonl", "heldout": "heldout.jsonl",
                                                    "general": {"general": "general.jsonl",
                                                                "english": "english.jsonl"}})
    recipe = validate_recipe(raw, name)
    assert recipe["search"] is not None and recipe["target"] == {"target_params": 0.5}
    assert recipe["data"]["general"] == {"general": "general.jsonl", "english": "english.jsonl"}
    assert "general" in recipe["synthetic"]["sources"]
    # The demo learns the teacher's text from the live teacher (with the hidden-state loss); the
    # quick one goes through the cache kept while sampling.
    assert (recipe["synthetic"]["keep_topk"] > 0) == (name == "demo-quick")


def test_general_sets_of_a_recipe(tmp_path):
    raw = builtin_recipe("demo-quick")
    raw.pop("corpus")
    raw.update(teacher="teacher", out="out", data={"train": "train.jsonl", "general": "one.jsonl"})
    assert validate_recipe(raw, "r")["data"]["general"] == {"general": "one.jsonl"}  # one set, named general
    for bad in ({"Train set": "x.jsonl"}, {"heldout": "x.jsonl"}, {"english": 3}):
        raw["data"]["general"] = bad
        with pytest.raises(InputError, match="data.general"):
            validate_recipe(raw, "r")
