"""``slimlm run`` with a ``search:`` section: the search picks the shape the prune stage cuts,
the distillation continues from the winner's short-distilled student with the re-ranking
tokens counted in its budget, the report gains a search section, a rerun resumes every
stage, and a budget the search cannot meet is refused before anything is written."""
import json

import yaml

from slimlm.search.records import WINNER_DIR

from .helpers import run_cli, stage_lines, write_recipe

SEARCH = {"top_n": 3, "top_k": 2, "num_blocks": 12, "seq_len": 16, "held_out": 4, "rerank_tokens": 64,
          "batch_size": 4, "space": {"max_width_prune": 0.5, "multiple_of": 16}}


def test_run_with_search(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "search.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, distill__max_tokens=256)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    record = json.loads((out / "search" / "search.json").read_text())
    winner = record["winner"]
    assert [row["rank"] for row in record["candidates"]] == [1, 2, 3]
    assert sum(row["distill_loss"] is not None for row in record["candidates"]) == 2
    # The pruned model is the winner's shape.
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        winner["hidden_size"], winner["intermediate_size"], winner["num_layers"])
    # The distillation continued from the winner and trained max_tokens minus its 64 re-ranking tokens.
    assert "continuing from the search's winner" in printed
    # The winner is kept in the dtype it trained in; the distilled student is saved in the teacher's.
    assert json.loads((out / "search" / WINNER_DIR / "config.json").read_text())["dtype"] == "float32"
    assert json.loads((out / "distilled" / "config.json").read_text())["dtype"] == config["dtype"]
    distilled = json.loads((out / "distilled" / "slimlm_distill.json").read_text())
    assert distilled["tokens_seen"] == 256 - 64
    report = (out / "report" / "report.md").read_text()
    assert "## Architecture search" in report and winner["key"] in report and "64 tokens count" in report
    assert (out / "report" / "search.png").is_file()

    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    lines = stage_lines(printed)
    assert any("zero-shot scored by an earlier run" in line for line in lines)
    assert not any("after the short distillation" in line for line in lines)  # no candidate distilled again
    assert all("running" not in line for line in lines if line.startswith(("[prune]", "[distill]", "[eval]")))


def test_run_refuses_a_search_budget_no_shape_meets(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "tiny-budget.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.01})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "slimlm run: error: search:" in err and "no legal shape meets the budget" in err
    assert not out.exists()


def test_run_refuses_too_few_tokens_for_the_search(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "few.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, distill__max_tokens=64)
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "counts the search's re-ranking tokens (64" in err
    assert not out.exists()


def test_search_recipe_fields_are_checked(workspace, capsys, tmp_path):
    for change, message in (({"top_k": 5}, "search.top_k 5 is larger than search.top_n 3"),
                            ({"space": {"max_width_prune": 1.5}}, "search.space: max_width_prune must be in [0, 1)"),
                            ({"bogus": 1}, "unknown field 'search.bogus'")):
        recipe = write_recipe(workspace, "bad-search.yaml", out=str(tmp_path / "bad"), synthetic=None,
                              search={**SEARCH, **change}, target={"target_params": 0.6})
        code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
        assert code == 2 and message in err, err
    recipe = write_recipe(workspace, "bad-budget.yaml", out=str(tmp_path / "bad"), synthetic=None, search=SEARCH,
                          target={"hidden_size": 32})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "target:" in err and "hidden_size" in err, err
    assert yaml.safe_load(recipe.read_text())["search"] == SEARCH


def test_a_search_of_other_inputs_in_the_run_folder_is_redone(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "stale.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, distill__max_tokens=128)
    assert run_cli(capsys, "run", recipe, "--no-progress")[0] == 0
    path = out / "search" / "search.json"
    record = json.loads(path.read_text())
    record["inputs"]["model"] = "another teacher"
    path.write_text(json.dumps(record))
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "holds a search of other inputs: deleting it" in printed
    assert sum("after the short distillation" in line for line in printed.splitlines()) == 2
    assert json.loads(path.read_text())["inputs"]["model"] != "another teacher"


def test_run_with_reconstruction_refits_the_searched_and_pruned_students(workspace, capsys, tmp_path):
    """A reconstruct section: the search's candidates and the pruned student are refitted
    (slimlm.surgery.reconstruct), the prune record says so, the search's inputs name it (so a
    run without it is another search), a rerun redoes nothing, and bad values exit 2 first."""
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "reconstruct.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, distill__max_tokens=128,
                          reconstruct={"num_samples": 4, "ridge": 0.5})
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert sum(line.startswith("[reconstruct]") for line in stage_lines(printed)) == 1  # once, shared
    record = json.loads((out / "pruned" / "slimlm_prune.json").read_text())
    assert record["reconstruct"]["ridge"] == 0.5 and record["reconstruct"]["tokens"] == 4 * 16
    search = json.loads((out / "search" / "search.json").read_text())
    assert search["inputs"]["reconstruct"] == record["reconstruct"]
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert all("running" not in line for line in stage_lines(printed) if line.startswith(("[prune]", "[distill]")))
    for change, message in (({"ridge": 0}, "reconstruct.ridge must be > 0"),
                            ({"num_samples": -1}, "reconstruct.num_samples must be > 0"),
                            ({"bogus": 1}, "unknown field 'reconstruct.bogus'")):
        bad = write_recipe(workspace, "bad-reconstruct.yaml", out=str(tmp_path / "bad"), synthetic=None,
                           reconstruct={"num_samples": 4, **change})
        code, _, err = run_cli(capsys, "run", bad, "--no-progress")
        assert code == 2 and message in err, err
        assert not (tmp_path / "bad").exists()
