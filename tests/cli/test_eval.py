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
