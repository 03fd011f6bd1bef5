"""``slimlm prune``: a loadable smaller model, by scores or by dropped layers; bad scores refused."""
import shutil

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
