"""What a recipe file cannot do to the process reading it: a YAML alias bomb (the "billion
laughs") is refused where it is written, wherever in the recipe, before anything is expanded;
and the numbers people write (``lr: 1e-4``) are numbers."""
import pytest

from slimlm.errors import InputError
from slimlm.demo import builtin_recipe
from slimlm.pipeline import load_recipe

BASE = {"teacher": "teacher", "data": "{train: data/*.txt}", "target": "{target_params: 0.5}"}


def recipe_text(**sections) -> str:
    """A valid recipe's lines, with ``sections`` (name → YAML text after ``name:``) added or replaced."""
    return "".join(f"{name}: {value}\n" for name, value in {**BASE, **sections}.items())


def bomb(indent: str, *, listed: bool, levels: int = 5, width: int = 10) -> str:
    """``levels`` anchored lists, each holding ``width`` aliases of the one before: width**levels
    leaves once expanded (few here: before the fix they were expanded), as the items of a list
    (``listed``) or the values of a mapping."""
    def item(level, values):
        return f"{indent}{'- ' if listed else f'l{level}: '}&l{level} [{', '.join(values)}]"

    return "\n".join([item(0, ["lol"] * width)] + [item(level, [f"*l{level - 1}"] * width)
                                                    for level in range(1, levels)])


@pytest.mark.parametrize("where", ["data.train", "distill.training_args", "eval.prompts", "top level"])
def test_an_alias_bomb_is_refused_wherever_it_sits(tmp_path, where):
    text = {
        "data.train": recipe_text(data=f"\n  train:\n{bomb('    ', listed=True)}"),
        "distill.training_args": recipe_text(distill=f"\n  training_args:\n{bomb('    ', listed=False)}"),
        "eval.prompts": recipe_text(eval=f"\n  prompts:\n{bomb('    ', listed=True)}"),
        "top level": recipe_text() + f"bomb:\n{bomb('  ', listed=False)}\n",
    }[where]
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    first_alias = next(number for number, line in enumerate(text.splitlines(), start=1) if "*l0" in line)
    with pytest.raises(InputError) as refused:
        load_recipe(path)
    assert str(refused.value) == (f"recipe {path}: YAML aliases (*l0) are not allowed (line {first_alias}); "
                                  "write the value out")


def test_a_full_size_bomb_is_refused_at_its_first_alias():
    from slimlm.pipeline.recipe import read_yaml

    text = "bomb:\n" + bomb("  ", listed=False, levels=9, width=9)  # 9**9: 387M leaves
    with pytest.raises(InputError, match=r"^recipe r.yaml: YAML aliases \(\*l0\) are not allowed \(line 3\)"):
        read_yaml(text, "recipe r.yaml")


def test_a_merge_key_is_an_alias_too_and_an_anchor_alone_is_harmless(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(recipe_text(importance="&settings {num_samples: 8}", distill="{<<: *settings}"))
    with pytest.raises(InputError, match=r"YAML aliases \(\*settings\) are not allowed \(line 5\)"):
        load_recipe(path)
    path.write_text(recipe_text(importance="&settings {num_samples: 8}"))
    assert load_recipe(path)["importance"]["num_samples"] == 8


def test_the_builtin_recipes_are_read_by_the_same_loader(monkeypatch):
    from importlib import resources

    class Aliased:
        def joinpath(self, name):
            return self

        def read_text(self, encoding):
            return "corpus: &c {train_chars: 1}\nagain: *c\n"

    monkeypatch.setattr(resources, "files", lambda package: Aliased())
    with pytest.raises(InputError, match=r"builtin recipe demo: YAML aliases \(\*c\) are not allowed \(line 2\)"):
        builtin_recipe("demo")


@pytest.mark.parametrize("section, text, field, expected", [
    ("distill", "{lr: 1e-4}", "lr", 1e-4),
    ("distill", "{lr: 5e-5}", "lr", 5e-5),
    ("distill", "{lr: 1.5E-3}", "lr", 1.5e-3),
    ("distill", "{max_minutes: 1E3}", "max_minutes", 1000.0),
    ("distill", "{beta: .5}", "beta", 0.5),
    ("distill", "{max_tokens: 2e6}", "max_tokens", 2_000_000),
    ("importance", "{num_samples: 1_000}", "num_samples", 1000),
    ("correct_teacher", "{tokens: 1e5, lr: 1e-5}", "tokens", 100_000),
    ("search", "{held_out: 5e-1}", "held_out", 0.5),
])
def test_numbers_as_people_write_them(tmp_path, section, text, field, expected):
    path = tmp_path / "numbers.yaml"
    path.write_text(recipe_text(**{section: text}))
    value = load_recipe(path)[section][field]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, message", [
    ("{lr: true}", "distill.lr: expected a number, got True"),
    ("{lr: fast}", "distill.lr: expected a number, got str 'fast'"),
    ("{lr: 1e}", "distill.lr: expected a number, got str '1e'"),
    ("{seq_len: 256.5}", "distill.seq_len: expected an integer, got float 256.5"),
    ("{seq_len: 1.5e-1}", "distill.seq_len: expected an integer, got float 0.15"),
    ("{max_tokens: yes}", "distill.max_tokens: expected an integer, got True"),
])
def test_what_is_not_a_number_of_the_field_is_still_refused(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe_text(distill=text))
    with pytest.raises(InputError) as refused:
        load_recipe(path)
    assert str(refused.value) == f"{path}: {message}"


def test_yaml_1_2_floats_leave_other_scalars_alone():
    from slimlm.pipeline.recipe import read_yaml

    assert read_yaml("[1e-4, -.5, +2E+2, 1_000, 0x10, 12, 1.5, e5, 1e, 1.2.3, '1e-4']", "test") == \
        [1e-4, -0.5, 200.0, 1000, 16, 12, 1.5, "e5", "1e", "1.2.3", "1e-4"]


def test_a_run_copy_of_its_recipe_reads_back_equal():
    from slimlm.pipeline.recipe import dump_yaml, read_yaml

    recipe = {"eval": {"prompts": ["1e5", ".5", "yes", "1_000", "plain"]},
              "distill": {"lr": 1e-05, "max_tokens": 10**6}, "data": {"heldout_fraction": 0.1, "train": ["a.txt"]}}
    assert read_yaml(dump_yaml(recipe), "copy") == recipe
