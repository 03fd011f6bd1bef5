"""Which errors are the user's to fix (exit 2, one line) and which are slimlm's (exit 1, one line
and how to see the traceback): only ``InputError`` and argparse's usage errors are exit 2, a
ValueError from deep inside is a runtime failure; ``--debug`` (or ``SLIMLM_DEBUG=1``) raises it;
``slimlm bench`` checks ``--filter`` before pytest runs; a recipe's alias bomb is bad input."""
import os

import pytest

from slimlm import cli

from .helpers import one_line_error, run_cli, write_recipe

HINT = "(SLIMLM_DEBUG=1 or --debug shows the traceback)"


def importance_argv(workspace, out):
    return ["importance", "--model", workspace / "teacher", "--data", workspace / "heldout.txt", "--seq-len", 16,
            "--num-samples", 2, "--out", out, "--no-progress"]


@pytest.mark.parametrize("error", [ValueError("a bug deep inside\nover two lines"),
                                   FileNotFoundError("/opt/some/cache/file")])
def test_an_error_from_deep_inside_is_a_runtime_failure(workspace, capsys, monkeypatch, tmp_path, error):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("slimlm.pipeline.importance.importance_stage", broken)
    code, _, err = run_cli(capsys, *importance_argv(workspace, tmp_path / "scores"))
    assert code == 1
    assert err.strip() == f"slimlm importance: error: {type(error).__name__}: {' '.join(str(error).split())} {HINT}"


@pytest.mark.parametrize("where", ["before the command", "after it", "environment"])
def test_debug_raises_with_the_traceback(workspace, capsys, monkeypatch, tmp_path, where):
    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr("slimlm.pipeline.importance.importance_stage", broken)
    argv = [str(arg) for arg in importance_argv(workspace, tmp_path / "scores")]
    if where == "before the command":
        argv = ["--debug"] + argv
    elif where == "after it":
        argv = argv + ["--debug"]
    else:
        monkeypatch.setenv("SLIMLM_DEBUG", "1")
    with pytest.raises(ValueError, match="a bug deep inside"):
        cli.main(argv)


def test_bad_input_stays_exit_2_and_debug_raises_it(workspace, capsys):
    from slimlm.errors import InputError

    argv = ["plan", "--model", workspace / "missing", "--target-params", "0.5"]
    code, _, err = run_cli(capsys, *argv)
    assert one_line_error(code, err, "plan") == f"slimlm plan: error: model {workspace / 'missing'} does not exist"
    with pytest.raises(InputError):
        cli.main([str(arg) for arg in argv] + ["--debug"])


def test_a_target_the_model_cannot_meet_is_bad_input(workspace, capsys):
    code, _, err = run_cli(capsys, "plan", "--model", workspace / "teacher", "--drop-layers", "0,7")
    assert "drop_layers [7] out of range" in one_line_error(code, err, "plan")


def test_distill_passes_debug_on_to_training_arguments():
    args, rest = cli.build_parser().parse_known_args(
        ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--debug", "underflow_overflow"])
    assert rest == ["--debug", "underflow_overflow"] and args.debug is False


def test_the_command_is_named_in_its_outputs_marker_and_releases_its_lock(workspace, capsys, tmp_path):
    import json

    from slimlm import __version__, outputs

    out = tmp_path / "pruned"
    code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--drop-layers", 1, "--out", out)
    assert code == 0, err
    marker = json.loads((out / outputs.MARKER).read_text())
    assert marker["written_by"] == "slimlm" and marker["command"] == "slimlm prune" and marker["version"] == __version__
    assert sorted(os.listdir(tmp_path)) == ["pruned"]  # no lock file left behind


def test_a_recipe_alias_bomb_is_bad_input(workspace, capsys):
    recipe = write_recipe(workspace, "bomb.yaml")
    lines = recipe.read_text().splitlines()
    lines[lines.index("  training_args:") + 1:lines.index("  training_args:") + 2] = [
        "    l0: &l0 [lol, lol, lol, lol]", "    l1: &l1 [*l0, *l0, *l0, *l0]", "    l2: [*l1, *l1, *l1, *l1]"]
    recipe.write_text("\n".join(lines) + "\n")
    line = lines.index("    l1: &l1 [*l0, *l0, *l0, *l0]") + 1
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert one_line_error(code, err, "run") == (f"slimlm run: error: recipe {recipe}: YAML aliases (*l0) are not "
                                                f"allowed (line {line}); write the value out")


@pytest.fixture
def benchmarks(tmp_path):
    """A benchmarks folder of one quick benchmark (bench_tiny.py), collected as the checkout's are."""
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / "pytest.ini").write_text("[pytest]\npython_files = bench_*.py\n")
    (folder / "bench_tiny.py").write_text("def test_tiny_sum(benchmark):\n"
                                          "    benchmark.pedantic(sum, args=([1, 2],), rounds=1, iterations=1)\n")
    return folder


@pytest.mark.parametrize("expression, message", [
    ("tiny and", "--filter is not a pytest -k expression: tiny and: at column 9: expected not OR left parenthesis "
                 "OR identifier; got end of input"),
    ("kl_dvi", "--filter 'kl_dvi' selects no benchmark (benchmarks: tiny)"),
])
def test_bench_refuses_a_filter_before_running(benchmarks, capsys, expression, message):
    code, out, err = run_cli(capsys, "bench", "--benchmarks", benchmarks, "--filter", expression)
    assert one_line_error(code, err, "bench") == f"slimlm bench: error: {message}"
    assert out == ""  # nothing launched


def test_bench_runs_a_filter_that_selects(benchmarks, capsys):
    code, out, err = run_cli(capsys, "bench", "--benchmarks", benchmarks, "--filter", "tiny or nothing")
    assert code == 0, out + err


def test_bench_refuses_a_folder_without_benchmarks(benchmarks, capsys):
    os.remove(benchmarks / "bench_tiny.py")
    code, _, err = run_cli(capsys, "bench", "--benchmarks", benchmarks)
    assert one_line_error(code, err, "bench") == f"slimlm bench: error: --benchmarks {benchmarks} holds no benchmark " \
                                                 "(bench_*.py)"


# Bad input that surfaces as a ValueError deep inside a library function: each is an InputError
# where it is checked (the conversions listed in issue 23, item 12).
def gpt2_model(folder, workspace):
    """A tiny GPT-2 (a model family slimlm has no adapter for) with the workspace's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64,
                               vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["seq_len over the model's", "a folder of text files", "an unsupported family",
                                  "no eval token pairs", "speed over the context", "not a scores folder",
                                  "scores without the layer axis"])
def test_bad_input_found_deep_inside_is_exit_2(workspace, capsys, tmp_path, case):
    teacher, data = workspace / "teacher", workspace / "heldout.txt"
    if case == "seq_len over the model's":
        command, argv, message = "importance", ["--model", teacher, "--data", data, "--seq-len", 4096,
                                               "--out", tmp_path / "s"], "is above the model's limit"
    elif case == "a folder of text files":
        command, argv, message = "importance", ["--model", teacher, "--data", workspace / "data", "--seq-len", 16,
                                               "--out", tmp_path / "s"], "is a folder but not a dataset"
    elif case == "an unsupported family":
        command, argv, message = "importance", ["--model", gpt2_model(tmp_path / "gpt2", workspace), "--data", data,
                                               "--seq-len", 16, "--out", tmp_path / "s"], "is not supported"
    elif case == "no eval token pairs":
        command, argv, message = "eval", ["--model", teacher, "--data", data, "--seq-len", 1], \
            "no block holds two consecutive real tokens"
    elif case == "speed over the context":
        command, argv, message = "eval", ["--model", teacher, "--speed", "--prompt-tokens", 4096, "--rounds", 1], \
            "exceeds the context"
    elif case == "not a scores folder":
        (tmp_path / "empty").mkdir()
        command, argv, message = "prune", ["--model", teacher, "--scores", tmp_path / "empty", "--target-params", 0.5,
                                          "--out", tmp_path / "p"], "is not an importance-scores folder"
    else:
        scores = tmp_path / "width-scores"
        assert run_cli(capsys, "importance", "--model", teacher, "--data", data, "--seq-len", 16, "--num-samples", 4,
                       "--depth", "", "--out", scores, "--no-progress")[0] == 0
        command, argv, message = "prune", ["--model", teacher, "--scores", scores, "--num-layers", 1,
                                          "--out", tmp_path / "p"], "needs scores for axis 'layer'"
    code, _, err = run_cli(capsys, command, *argv, "--no-progress")
    assert message in one_line_error(code, err, command)
