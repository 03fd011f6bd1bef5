"""slimlm search on the shared tiny workspace: the ranked table, the winner's Target (and the
prune command that gives it), the outputs, a rerun that resumes, --overwrite, and every bad
input refused with one line, exit 2, before any work and with the inputs untouched."""
import json

import pytest

from tests.tiny import tiny_model, word_tokenizer

from .helpers import one_line_error, run_cli, scores_dir, sentences, tree

SMALL = ["--seq-len", 16, "--batch-size", 4, "--held-out", 4, "--no-progress"]


def search_args(workspace, capsys, out, *extra):
    return ["search", "--model", workspace / "teacher", "--scores", scores_dir(workspace, capsys), "--data",
            str(workspace / "data" / "*.txt"), "--out", out, *SMALL, *extra]


def test_search_prints_the_ranking_and_a_winner_prune_reproduces(workspace, capsys, tmp_path):
    out = tmp_path / "search"
    code, printed, err = run_cli(capsys, *search_args(workspace, capsys, out, "--target-params", 0.6, "--top-n", 5,
                                                      "--top-k", 2, "--rerank-tokens", 64))
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    assert [row["rank"] for row in record["candidates"]] == [1, 2, 3, 4, 5]
    assert sum(row["distill_loss"] is not None for row in record["candidates"]) == 2
    assert {"search.csv", "search.png", "winner_target.json", "winner"} <= {path.name for path in out.iterdir()}
    lines = printed.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("rank"))
    table = lines[header + 1: header + 6]
    assert [line.split()[1] for line in table] == [row["key"] for row in record["candidates"]]
    assert table[-1].split()[-1] == "-"  # not re-ranked
    winner = record["winner"]
    assert f"winner Target: hidden_size={winner['hidden_size']}" in printed

    # The printed prune command gives the winner's shape and parameter count.
    command = next(line for line in lines if line.startswith("prune to it:")).split(":", 1)[1].split()
    student = tmp_path / "student"
    code, _, err = run_cli(capsys, *command[1:-1], student)
    assert code == 0, err
    config = json.loads((student / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (winner["hidden_size"], winner["intermediate_size"])

    # A rerun resumes: every candidate is read back, nothing is scored or distilled again.
    code, again, err = run_cli(capsys, *search_args(workspace, capsys, out, "--target-params", 0.6, "--top-n", 5,
                                                    "--top-k", 2, "--rerank-tokens", 64))
    assert code == 0, err
    assert again.count("scored by an earlier run") == 5 and "after the short distillation" not in again
    assert json.loads((out / "search.json").read_text())["candidates"] == record["candidates"]

    # Other settings into the same folder: refused; with --overwrite, a fresh search replaces it.
    code, _, err = run_cli(capsys, *search_args(workspace, capsys, out, "--target-params", 0.6, "--top-n", 4,
                                                "--top-k", 0))
    assert "other inputs" in one_line_error(code, err, "search")
    code, _, err = run_cli(capsys, *search_args(workspace, capsys, out, "--target-params", 0.6, "--top-n", 4,
                                                "--top-k", 0, "--overwrite"))
    assert code == 0, err
    assert len(json.loads((out / "search.json").read_text())["candidates"]) == 4


def test_a_memory_budget_and_both_depth_choices(workspace, capsys, tmp_path):
    out = tmp_path / "search"
    code, printed, err = run_cli(capsys, *search_args(workspace, capsys, out, "--target-memory", "120KB",
                                                      "--at-batch", 2, "--at-seq", 32, "--dtype", "bfloat16",
                                                      "--tolerance", 0.3, "--top-n", 6, "--top-k", 0,
                                                      "--max-depth-prune", 0.5, "--depth-selection", "both"))
    assert code == 0, err
    record = json.loads((out / "search.json").read_text())
    assert all(84_000 <= row["memory_bytes"] <= 120_000 for row in record["candidates"])
    assert "memory" in next(line for line in printed.splitlines() if line.startswith("rank"))
    assert record["inputs"]["budget"]["dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def other_scores(workspace):
    """Scores of another model (same shape, other weights)."""
    folder = workspace / "other"
    if not (folder / "scores" / "meta.json").is_file():
        tokenizer = word_tokenizer()
        model = tiny_model("llama", "training", seed=5, vocab_size=len(tokenizer), hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2)
        model.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        from slimlm import cli

        assert cli.main(["importance", "--model", str(folder / "model"), "--data", str(workspace / "data" / "*.txt"),
                         "--num-samples", "8", "--seq-len", "16", "--out", str(folder / "scores"),
                         "--no-progress"]) == 0
    return folder / "scores"


BAD = {
    "unreachable budget": (["--target-params", 0.05], "smallest the search space allows"),
    "memory without batch/seq": (["--target-memory", "1MiB", "--at-batch", 2], "give --at-seq"),
    "batch/seq without memory": (["--target-params", 0.6, "--at-seq", 8], "mean nothing with --target-params"),
    "no budget": ([], "exactly one of --target-params and --target-memory"),
    "both budgets": (["--target-params", 0.6, "--target-memory", "1MiB"], "exactly one of"),
    "bad memory size": (["--target-memory", "lots", "--at-batch", 1, "--at-seq", 8], "not a size like"),
    "K over the candidates": (["--target-params", 0.6, "--top-n", 50, "--top-k", 40], "only .* candidate"),
    "K over N": (["--target-params", 0.6, "--top-n", 2, "--top-k", 3], "--top-k 3 is larger than --top-n 2"),
    "negative K": (["--target-params", 0.6, "--top-k", -1], "--top-k must be >= 0"),
    "a held-out part-block": (["--target-params", 0.6, "--held-out", 2.5], "--held-out: a fraction in"),
    "bad space": (["--target-params", 0.6, "--max-width-prune", 1.5], "max_width_prune must be in"),
    "unknown training flag": (["--target-params", 0.6, "--no_such_flag", 1], "unknown option"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_before_any_work(case, workspace, capsys, tmp_path):
    import re

    flags, message = BAD[case]
    before = tree(workspace / "teacher")
    out = tmp_path / "search"
    code, _, err = run_cli(capsys, *search_args(workspace, capsys, out, "--top-n", 4, "--top-k", 1, *flags))
    assert re.search(message, one_line_error(code, err, "search"))
    assert not out.exists() and tree(workspace / "teacher") == before


def test_too_little_data_scores_of_another_model_and_an_overlapping_output(workspace, capsys, tmp_path, other_scores):
    (tmp_path / "one.txt").write_text(sentences(1, 3)[0])
    args = search_args(workspace, capsys, tmp_path / "search", "--target-params", 0.6, "--top-n", 4, "--top-k", 1)
    data = args.index("--data") + 1
    code, _, err = run_cli(capsys, *args[:data], tmp_path / "one.txt", *args[data + 1:])
    assert "too small for the held-out split" in one_line_error(code, err, "search")

    scores = args.index("--scores") + 1
    code, _, err = run_cli(capsys, *args[:scores], other_scores, *args[scores + 1:])
    assert "not on this model" in one_line_error(code, err, "search")

    before = tree(workspace / "teacher")
    out = args.index("--out") + 1
    for inside, relation in ((workspace / "teacher" / "search", "is inside the model"),
                             (scores_dir(workspace, capsys), "is the scores"), (workspace, "contains the model")):
        code, _, err = run_cli(capsys, *args[:out], inside, *args[out + 1:])
        assert relation in one_line_error(code, err, "search")
    assert tree(workspace / "teacher") == before and not (workspace / "teacher" / "search").exists()


def test_help_lists_the_budget_space_and_ranking_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "search", "--help")
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    for flag in ("--target-memory", "--at-batch", "--at-seq", "--top-n", "--top-k", "--rerank-tokens",
                 "--max-width-prune", "--max-depth-prune", "--multiple-of", "--depth-selection", "examples:"):
        assert flag in printed


def test_two_gloo_processes_give_one_process_search(workspace, capsys, tmp_path):
    """torchrun, 2 CPU processes: the zero-shot candidates are split over the ranks and
    gathered, the short distillations run data-parallel on the same global batch, rank 0
    alone writes and prints; the ranking and losses are one process's."""
    import os
    import subprocess
    import sys

    from tests.distill.test_trainer import launcher_env

    # 4 steps of 4 blocks at a learning rate that moves the students (a TrainingArguments flag).
    settings = ["--target-params", 0.6, "--top-n", 5, "--top-k", 2, "--rerank-tokens", 256, "--learning_rate", 0.01]
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run_cli(capsys, *search_args(workspace, capsys, one, *settings))
    assert code == 0, err
    env = launcher_env()
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.dirname(__file__))), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slimlm",
               *map(str, search_args(workspace, capsys, two, *settings))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("winner Target:") == 1  # rank 0 alone prints
    single, distributed = (json.loads((folder / "search.json").read_text()) for folder in (one, two))
    assert distributed["inputs"] == single["inputs"]
    assert [row["key"] for row in distributed["candidates"]] == [row["key"] for row in single["candidates"]]
    for row, expected in zip(distributed["candidates"], single["candidates"]):
        assert (row["zero_shot_kd_loss"], row["lm_loss"]) == (expected["zero_shot_kd_loss"], expected["lm_loss"])
        assert row["distill_loss"] == (None if expected["distill_loss"] is None
                                       else pytest.approx(expected["distill_loss"], rel=1e-4, abs=1e-6))
    # The short runs moved the students far more than the two launches differ.
    assert all(row["distill_loss"] != pytest.approx(row["zero_shot_kd_loss"], rel=0.5) for row in single["candidates"][:2])
    assert (two / "winner_target.json").read_text() == (one / "winner_target.json").read_text()
    assert sorted(path.name for path in two.iterdir()) == sorted(path.name for path in one.iterdir())
