"""``slimlm prune``: a loadable smaller model, by scores or by dropped layers; bad scores refused."""
import shutil

import pytest

from transformers import AutoModelForCausalLM

from .helpers import one_line_error, pruned_dir, run_cli, scores_dir


def test_prune_writes_a_loadable_smaller_model(workspace, capsys):
    out = pruned_dir(workspace, capsys)
    teacher = AutoModelForCausalLM.from_pretrained(workspace / "teacher")
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.num_parameters() <= 0.5 * teacher.num_parameters()
    assert (out / "tokenizer.json").is_file()


def test_prune_by_dropped_layers_needs_no_scores(workspace, capsys):
    out = workspace / "dropped"
    code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--drop-layers", "1", "--out", out)
    assert code == 0, err
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_truncated_scores_are_bad_input(workspace, capsys, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(scores_dir(workspace, capsys), scores)
    data = (scores / "scores.safetensors").read_bytes()
    (scores / "scores.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--scores", scores, "--target-params",
                           "0.5", "--out", tmp_path / "pruned")
    assert f"scores {scores}" in one_line_error(code, err, "prune")
    assert not (tmp_path / "pruned").exists()


def test_prune_saves_in_the_source_dtype_or_the_one_asked(workspace, capsys, tmp_path):
    import json

    import torch
    from safetensors import safe_open

    def saved(folder):
        with safe_open(folder / "model.safetensors", "pt") as handle:
            dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}
        return json.loads((folder / "config.json").read_text())["dtype"], dtypes

    common = ["prune", "--model", workspace / "teacher", "--drop-layers", "1"]
    assert run_cli(capsys, *common, "--out", tmp_path / "auto")[0] == 0
    assert saved(tmp_path / "auto") == ("float32", {torch.float32})  # the tiny teacher is a float32 checkpoint
    assert run_cli(capsys, *common, "--save-dtype", "bfloat16", "--out", tmp_path / "bf16")[0] == 0
    assert saved(tmp_path / "bf16") == ("bfloat16", {torch.bfloat16})
    # A bf16 source saves in bf16 by default, whatever dtype it was pruned in (float32 on CPU).
    teacher_bf16 = tmp_path / "teacher-bf16"
    shutil.copytree(workspace / "teacher", teacher_bf16)
    AutoModelForCausalLM.from_pretrained(workspace / "teacher", dtype=torch.bfloat16).save_pretrained(teacher_bf16)
    assert run_cli(capsys, "prune", "--model", teacher_bf16, "--drop-layers", "0", "--out", tmp_path / "again")[0] == 0
    assert saved(tmp_path / "again") == ("bfloat16", {torch.bfloat16})
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, *common, "--save-dtype", "int8", "--out", tmp_path / "bad")
    assert exit_info.value.code == 2 and "--save-dtype: invalid choice: 'int8'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_prune_with_data_refits_the_projections(workspace, capsys, tmp_path):
    """--data: o_proj/down_proj refitted on calibration blocks (recorded); the same cut without it
    differs only in those projections; a missing data path or a bad ridge exits 2 first."""
    import json

    from safetensors.torch import load_file

    common = ["prune", "--model", workspace / "teacher", "--scores", scores_dir(workspace, capsys),
              "--intermediate-size", "32"]
    code, printed, err = run_cli(capsys, *common, "--data", str(workspace / "data" / "*.txt"), "--num-samples", "4",
                                 "--seq-len", "16", "--out", tmp_path / "refit")
    assert code == 0, err
    assert "reconstruction: o_proj/down_proj input statistics of 64 tokens" in printed
    record = json.loads((tmp_path / "refit" / "slimlm_prune.json").read_text())
    assert record["reconstruct"]["tokens"] == 64 and record["reconstruct"]["ridge"] == 1.0
    assert run_cli(capsys, *common, "--out", tmp_path / "plain")[0] == 0
    refit, plain = load_file(tmp_path / "refit" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    differ = {name for name in plain if not (refit[name] == plain[name]).all()}
    assert differ and all(name.endswith("mlp.down_proj.weight") for name in differ), differ

    code, _, err = run_cli(capsys, *common, "--data", str(tmp_path / "missing.txt"), "--out", tmp_path / "bad")
    assert "missing.txt" in one_line_error(code, err, "prune")
    code, _, err = run_cli(capsys, *common, "--data", str(workspace / "data" / "*.txt"), "--ridge", "0",
                           "--out", tmp_path / "bad")
    assert "--ridge must be > 0" in one_line_error(code, err, "prune")
    assert not (tmp_path / "bad").exists()
