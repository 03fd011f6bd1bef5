"""``slimlm gradual`` and a recipe's ``schedule:`` on the shared tiny workspace: two steps to the
budget (each step's student a stock checkpoint), a rerun that reads every step back, a run of
other settings refused into the same folder, bad schedules refused with one line (exit 2)
before anything is written, and ``slimlm run`` putting the last step where eval and the report
read the distilled student."""
import json
import re

import pytest
from transformers import AutoModelForCausalLM

from slimlm.evaluate import count_params

from .helpers import one_line_error, run_cli, stage_lines, write_recipe

SMALL = ["--seq-len", 16, "--batch-size", 4, "--num-samples", 8, "--depth", "block_influence", "--num-blocks", 12,
         "--held-out", 4, "--top-n", 2, "--top-k", 1, "--rerank-tokens", 32, "--max-width-prune", 0.5,
         "--multiple-of", 16, "--lr", 1e-3, "--no-progress"]


def gradual_args(workspace, out, *extra, target="0.6", max_tokens=256):
    return ["gradual", "--teacher", workspace / "teacher", "--data", str(workspace / "data" / "*.txt"),
            "--target-params", target, "--out", out, *SMALL,
            *(["--max-tokens", max_tokens] if max_tokens is not None else []), *extra]


def test_gradual_reaches_the_budget_in_steps_and_a_rerun_reads_them_back(workspace, capsys, tmp_path):
    out = tmp_path / "gradual"
    args = gradual_args(workspace, out, "--steps", 2, "--token-split", "back", "--no-rescore", "--heldout",
                        workspace / "heldout.txt")
    code, printed, err = run_cli(capsys, *args)
    assert code == 0, err
    record = json.loads((out / "gradual.json").read_text())
    assert record["final"] == "steps/step-2" and record["token_shares"] == [85, 171]
    steps = record["steps"]
    assert [step["scores"] for step in steps] == ["teacher", "carried"]
    assert steps[1]["params"] < steps[0]["params"] < record["teacher_params"]
    assert (1 - record["tolerance"]) * record["final_params"] <= steps[1]["params"] <= record["final_params"]
    for step in steps:
        model = AutoModelForCausalLM.from_pretrained(out / "steps" / f"step-{step['step']}")
        assert count_params(model) == step["params"]
        assert set(step["perplexity"]["cut"]) == set(step["perplexity"]["step"]) == {"heldout"}
    assert "## Gradual pruning" in printed and f"final student: {out / 'steps' / 'step-2'}" in printed

    code, printed, err = run_cli(capsys, *args)
    assert code == 0, err
    assert sum("is already done" in line for line in stage_lines(printed)) == 2
    assert json.loads((out / "gradual.json").read_text())["steps"] == steps

    code, _, err = run_cli(capsys, *gradual_args(workspace, out, "--steps", 2, max_tokens=320))
    assert "holds a gradual run of other inputs" in one_line_error(code, err, "gradual")


@pytest.mark.parametrize("extra, message", [
    (["--steps", 1], "--steps must be >= 2"),
    (["--token-split", "0.5,0"], "--token-split gives a step no tokens"),
    (["--token-split", "0.3,0.3"], "--token-split fractions sum to 0.6, not 1"),
    (["--step-budgets", "0.5,0.7"], r"--step-budgets must decrease strictly \(a step never grows\)"),
    (["--step-budgets", "0.8,0.5"], "the last step's budget 0.5 .* is not the final target"),
    (["--max-tokens", 1], "step 1 of 2 gets 0 of the 1 distillation tokens"),
    (["--max-tokens", 100], "step 1's share of 50 distillation tokens does not cover its search's re-ranking"),
    (["--target-params", "0.01"], "no legal shape meets the budget"),
])
def test_bad_schedules_are_refused_with_one_line_before_any_work(workspace, capsys, tmp_path, extra, message):
    out = tmp_path / "bad"
    code, _, err = run_cli(capsys, *gradual_args(workspace, out, *extra))
    assert re.search(message, one_line_error(code, err, "gradual")), err
    assert not out.exists()


def test_gradual_needs_a_token_budget(workspace, capsys, tmp_path):
    code, _, err = run_cli(capsys, *gradual_args(workspace, tmp_path / "bad", max_tokens=None))
    assert "the steps share distill.max_tokens (--max-tokens)" in one_line_error(code, err, "gradual")


SEARCH = {"top_n": 2, "top_k": 1, "num_blocks": 12, "seq_len": 16, "held_out": 4, "rerank_tokens": 32,
          "batch_size": 4, "space": {"max_width_prune": 0.5, "multiple_of": 16}}


def test_run_with_a_schedule_evaluates_and_reports_the_last_step(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "gradual.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, schedule={"steps": 2}, distill__max_tokens=256)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    record = json.loads((out / "gradual.json").read_text())
    final = json.loads((out / "steps" / "step-2" / "config.json").read_text())
    assert json.loads((out / "distilled" / "config.json").read_text()) == final
    assert json.loads((out / "pruned" / "config.json").read_text())["hidden_size"] == final["hidden_size"]
    assert not (out / "search").exists()  # each step searched in its own work folder
    assert (out / "plan.txt").read_text().startswith("step 1:\nPrunePlan")
    results = json.loads((out / "eval.json").read_text())["results"]
    assert results[2]["params"] == record["steps"][1]["params"]
    assert (out / "report" / "report.md").is_file()

    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    lines = stage_lines(printed)
    assert sum(line.startswith("[gradual] step") and "is already done" in line for line in lines) == 2
    assert all("running" not in line for line in lines if line.startswith(("[eval]", "[importance]")))


def test_a_schedule_without_a_search_is_refused_before_any_work(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "no-search.yaml", out=str(out), synthetic=None, schedule={"steps": 2})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert "schedule: each step's shape is chosen by the architecture search" in one_line_error(code, err, "run")
    assert not out.exists()
    recipe = write_recipe(workspace, "bad-schedule.yaml", out=str(out), synthetic=None, search=SEARCH,
                          target={"target_params": 0.6}, schedule={"steps": 2, "token_split": [0.5, 0.6]})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert "schedule.token_split fractions sum to 1.1, not 1" in one_line_error(code, err, "run")
