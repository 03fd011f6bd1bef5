"""``slimlm`` itself (``slimlm.cli.main`` / ``entry``): help with examples for every command,
``python -m slimlm``, and the exit codes (0 ok, 1 runtime failure, 2 bad input) with their
one-line messages; the rules every command keeps about inputs, outputs and custom model code."""
import os
import subprocess
import sys

import pytest

from slimlm import cli

from .helpers import damaged_model, model_with_custom_code, one_line_error, pruned_dir, run_cli, scores_dir, tree, \
    write_recipe


@pytest.mark.parametrize("command", ["importance", "plan", "prune", "generate", "distill", "eval", "run", "demo",
                                     "bench"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"slimlm {command}" in out


def test_python_dash_m_entry_point_and_one_line_errors(workspace):
    ok = subprocess.run([sys.executable, "-m", "slimlm", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("slimlm ")
    bad = subprocess.run([sys.executable, "-m", "slimlm", "plan", "--model", str(workspace / "nope"),
                          "--target-params", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"slimlm plan: error: model {workspace / 'nope'} does not exist"]


@pytest.mark.parametrize("argv, message", [
    (["plan", "--model", "{ws}/missing", "--target-params", "0.5"], "model {ws}/missing does not exist"),
    (["importance", "--model", "{ws}/teacher", "--data", "{ws}/nothing.txt", "--out", "{ws}/s2"],
     "data {ws}/nothing.txt does not exist"),
    (["importance", "--model", "{ws}/teacher", "--data", "{ws}/heldout.txt", "--metrics", "bogus", "--seq-len", "16",
      "--out", "{ws}/s3", "--no-progress"], "bogus"),
    (["plan", "--model", "{ws}/teacher", "--target-params", "10B"], "larger than the model"),
    (["prune", "--model", "{ws}/teacher", "--scores", "{ws}/scores", "--target-params", "0.5", "--out", "{ws}/pruned"],
     "already exists; pass --overwrite"),
    (["prune", "--model", "{ws}/teacher", "--target-params", "0.5", "--out", "{ws}/p2"], "--scores is required"),
    (["plan", "--model", "{ws}/teacher"], "say what to prune to"),
    (["bench", "--benchmarks", "{ws}/nowhere"], "no benchmarks/ folder"),
])
def test_bad_input_gives_one_line_and_exit_2(workspace, capsys, argv, message):
    scores_dir(workspace, capsys)
    pruned_dir(workspace, capsys)
    code, _, err = run_cli(capsys, *[arg.format(ws=workspace) for arg in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"slimlm {argv[0]}: error: ")
    assert message.format(ws=workspace) in lines[0]


def test_unknown_flag_values_are_usage_errors(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--model", str(workspace / "teacher"), "--dtype", "float8", "--target-params", "0.5"])
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--model", str(workspace / "teacher"), "--frobnicate"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_drop_layers_and_max_minutes_refuse_empty_and_zero(workspace, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "--model", str(workspace / "teacher"), "--drop-layers", ",", "--out", "x"])
    assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err
    # A well-formed value its check refuses: one line naming the flag, exit 2, before any work.
    code, _, err = run_cli(capsys, "distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o",
                           "--max-minutes", "0")
    assert "--max-minutes must be > 0" in one_line_error(code, err, "distill")


def test_runtime_failure_is_exit_1(workspace, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nwhile doing things")

    monkeypatch.setattr("slimlm.pipeline.importance.importance_stage", broken)
    code, _, err = run_cli(capsys, "importance", "--model", workspace / "teacher", "--data", workspace / "heldout.txt",
                           "--seq-len", 16, "--out", workspace / "s4")
    assert code == 1
    assert err.strip() == ("slimlm importance: error: RuntimeError: out of memory while doing things "
                           "(SLIMLM_DEBUG=1 or --debug shows the traceback)")


@pytest.mark.parametrize("damage", ["corrupt weights", "truncated weights", "invalid config", "no weights"])
def test_a_damaged_model_is_bad_input(workspace, capsys, tmp_path, damage):
    folder = tmp_path / "model"
    damaged_model(workspace, folder, damage)
    code, _, err = run_cli(capsys, "plan", "--model", folder, "--target-params", "0.5")
    assert f"model {folder}" in one_line_error(code, err, "plan")


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_custom_model_code_never_runs_without_trust_remote_code(workspace, capsys, tmp_path, monkeypatch,
                                                                model_type):
    import builtins
    import io

    folder = tmp_path / "custom"
    marker = model_with_custom_code(folder, workspace, model_type)
    stdin = io.StringIO("y\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("asked on stdin whether to run custom code"))
    code, out, err = run_cli(capsys, "plan", "--model", folder, "--target-params", "0.5")
    if model_type == "llama":  # transformers' own Llama class loads it; its auto_map is ignored
        assert code == 0, err
    else:
        assert "--trust-remote-code" in one_line_error(code, err, "plan")
    # A recipe's teacher goes the same way, and nothing is written for a run that cannot start.
    recipe = write_recipe(workspace, f"custom-{model_type}.yaml", teacher=str(folder), out=str(tmp_path / "run"),
                          target={"target_params": "10B"})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and not (tmp_path / "run").exists()
    assert not marker.exists() and stdin.tell() == 0


@pytest.mark.parametrize("argv, relation", [
    (["distill", "--teacher", "teacher", "--student", "pruned", "--data", "data/*.txt", "--out", ".",
      "--overwrite"], "output . contains the teacher"),
    (["distill", "--teacher", "teacher", "--student", "pruned", "--data", "data/*.txt", "--out", "teacher",
      "--overwrite"], "output teacher is the teacher"),
    (["distill", "--teacher", "teacher", "--student", "pruned", "--data", "data/*.txt", "--out", "data",
      "--overwrite"], "output data contains the data"),
    (["generate", "--teacher", "teacher", "--from-data", "heldout.txt", "--out", "teacher/model.safetensors",
      "--overwrite"], "output teacher/model.safetensors is inside the teacher"),
    (["generate", "--teacher", "teacher", "--from-data", "heldout.txt", "--out", "heldout.txt", "--overwrite"],
     "output heldout.txt is the data"),
    (["prune", "--model", "teacher", "--drop-layers", "1", "--out", "teacher/sub"], "output teacher/sub is inside"),
    (["prune", "--model", "teacher", "--scores", "scores", "--target-params", "0.5", "--out", "scores",
      "--overwrite"], "output scores is the scores"),
    (["eval", "--model", "teacher", "--data", "heldout.txt", "--json", "heldout.txt", "--overwrite"],
     "--json file heldout.txt is the data"),
])
def test_overwrite_never_deletes_or_writes_into_an_input(workspace, capsys, monkeypatch, argv, relation):
    scores_dir(workspace, capsys)
    pruned_dir(workspace, capsys)
    monkeypatch.chdir(workspace)
    before = tree(workspace)
    code, _, err = run_cli(capsys, *argv)
    assert relation in one_line_error(code, err, argv[0])
    assert tree(workspace) == before


def test_overwrite_replaces_only_slimlm_outputs(workspace, capsys, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "distill", "--teacher", workspace / "teacher", "--student",
                           pruned_dir(workspace, capsys), "--data", workspace / "heldout.txt", "--out", foreign,
                           "--overwrite")
    assert "was not written by slimlm" in one_line_error(code, err, "distill")
    assert (foreign / "todo.txt").read_text() == "keep me"


def test_pruned_folders_are_readable_like_any_other(workspace, capsys):
    umask = os.umask(0)
    os.umask(umask)
    for folder in (pruned_dir(workspace, capsys), scores_dir(workspace, capsys)):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask


def test_the_dtype_choices_are_the_one_dtype_table():
    from slimlm.cli import arguments
    from slimlm.models import DTYPE_NAMES, DTYPES

    assert arguments.SAVE_DTYPES == ("auto", *DTYPE_NAMES) and set(DTYPE_NAMES) <= set(DTYPES)
