"""``slimlm eval``: a side-by-side table of models on the same blocks."""
import json
import os

import pytest

from .helpers import one_line_error, pruned_dir, run_cli


def test_eval_compare_prints_a_side_by_side_table(workspace, capsys):
    code, out, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--compare", pruned_dir(workspace, capsys),
                             "--data", workspace / "heldout.txt", "--seq-len", 16, "--prompt", "the model",
                             "--max-new-tokens", 3, "--json", workspace / "eval.json", "--no-progress")
    assert code == 0, err
    header, rule, first, second = out.splitlines()[:4]
    assert header.split()[:2] == ["model", "params"]
    assert first.startswith(str(workspace / "teacher")) and second.startswith(str(workspace / "pruned"))
    results = json.loads((workspace / "eval.json").read_text())
    assert results[0]["params"] > results[1]["params"] and results[0]["perplexity"] > 1
    assert "prompt: the model" in out


def test_eval_json_into_a_folder_fails_before_any_work(workspace, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("slimlm.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated first"))
    code, _, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--data", workspace / "heldout.txt",
                           "--json", tmp_path)
    assert "is a folder" in one_line_error(code, err, "eval")
    assert os.listdir(tmp_path) == []


SPEED_FLAGS = ["--speed", "--prompt-tokens", 8, "--new-tokens", 3, "--rounds", 1, "--speed-batch-sizes", "1,2"]


def test_eval_speed_alone_needs_no_data_and_puts_its_figures_in_the_json(workspace, capsys, tmp_path):
    teacher, student = workspace / "teacher", pruned_dir(workspace, capsys)
    path = tmp_path / "speed.json"
    code, out, err = run_cli(capsys, "eval", "--model", teacher, "--compare", student, *SPEED_FLAGS, "--json", path,
                             "--no-progress")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:4] == ["model", "batch", "prefill", "tok/s"] and "TTFT" in header and "TPOT" in header
    rows = [line.split() for line in lines[2:6]]
    assert [(row[0], row[1]) for row in rows] == [(str(teacher), "1"), (str(teacher), "2"), (str(student), "1"),
                                                  (str(student), "2")]
    assert rows[0][3] == "1.00"  # the teacher is the reference of the ratios
    results = json.loads(path.read_text())
    assert [result["name"] for result in results] == [str(teacher), str(student)]
    for result in results:
        speed = result["speed"]
        assert set(speed["batch"]) == {"1", "2"} and speed["disk_bytes"] > 0 and speed["setup"]["prompt_tokens"] == 8
        for figures in speed["batch"].values():
            assert {"ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s", "kv_cache_bytes",
                    "memory_bytes"} <= set(figures)
    assert results[1]["speed"]["ratios"]["params"] < 0.6
    # The file is slimlm's own: a rerun replaces it with --overwrite.
    code, _, err = run_cli(capsys, "eval", "--model", teacher, *SPEED_FLAGS, "--json", path, "--overwrite")
    assert code == 0, err


def test_eval_speed_with_data_prints_both_tables(workspace, capsys):
    code, out, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--data", workspace / "heldout.txt",
                             "--seq-len", 16, *SPEED_FLAGS, "--no-progress")
    assert code == 0, err
    assert out.splitlines()[0].split()[:2] == ["model", "params"] and "decode tok/s" in out


def test_eval_without_data_or_speed_is_bad_input(workspace, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", workspace / "teacher")
    assert "--data is required" in one_line_error(code, err, "eval")


@pytest.mark.parametrize("flags, message", [(["--new-tokens", 1], "--new-tokens must be >= 2, got 1"),
                                            (["--rounds", 0], "--rounds must be > 0"),
                                            (["--seq-len", 0], "--seq-len must be > 0")])
def test_a_refused_setting_is_one_line_naming_its_flag(workspace, capsys, flags, message):
    code, _, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--speed", *flags)
    assert message in one_line_error(code, err, "eval")
