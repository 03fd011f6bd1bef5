"""The slimlm command on a tiny random Llama saved to disk: every subcommand, `run` resuming,
and each bad input's one-line message and exit code (0 ok, 1 runtime failure, 2 bad input)."""
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm import cli
from slimlm.pipeline import distill as distill_step
from slimlm.data import load_texts, tokenize_blocks
from tests.tiny import WORDS, tiny_model, word_tokenizer


def sentences(count, seed):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(6, 14))) + " ." for _ in range(count)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer = word_tokenizer()
    # Wide enough that half the parameters is reachable within the planner's per-axis floors.
    model = tiny_model("llama", "training", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    (root / "data").mkdir()
    for index in range(4):
        (root / "data" / f"train{index}.txt").write_text("\n\n".join(sentences(12, index)))
    (root / "heldout.txt").write_text("\n\n".join(sentences(10, 99)))
    return root


def run_cli(capsys, *argv):
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def scores_dir(workspace, capsys):
    out = workspace / "scores"
    if not (out / "meta.json").is_file():
        code, _, err = run_cli(capsys, "importance", "--model", workspace / "teacher", "--data",
                               str(workspace / "data" / "*.txt"), "--num-samples", 8, "--seq-len", 16, "--out", out,
                               "--no-progress")
        assert code == 0, err
    return out


def pruned_dir(workspace, capsys):
    out = workspace / "pruned"
    if not (out / "config.json").is_file():
        code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--scores",
                               scores_dir(workspace, capsys), "--target-params", "0.5", "--out", out)
        assert code == 0, err
    return out


# ------------------------------------------------------------------ help
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


# ------------------------------------------------------------ each stage
def test_importance_writes_scores(workspace, capsys):
    out = scores_dir(workspace, capsys)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 8 and meta["depth"] == ["block_influence", "loss_drop"]


def test_plan_prints_the_table_and_writes_nothing(workspace, capsys):
    before = sorted(os.listdir(workspace / "teacher"))
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5", "--json")
    assert code == 0
    assert "params.total" in out and "weights in memory" in out
    plan = json.loads(out[out.index("{"):])
    assert plan["params_after"]["total"] <= 0.5 * plan["params_before"]["total"]
    assert sorted(os.listdir(workspace / "teacher")) == before


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


def test_generate_from_data(workspace, capsys):
    out = workspace / "synthetic.jsonl"
    code, stdout, err = run_cli(capsys, "generate", "--teacher", workspace / "teacher", "--from-data",
                                workspace / "heldout.txt", "--num-prompts", 3, "--max-new-tokens", 4, "--out", out,
                                "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(records) <= 3 and all(r["text"].startswith(r["prompt"]) for r in records)
    code, _, err = run_cli(capsys, "generate", "--teacher", workspace / "teacher", "--from-data",
                           workspace / "heldout.txt", "--out", out)
    assert code == 2 and "--overwrite" in err


def test_distill_passes_training_arguments_through(workspace, capsys):
    out = workspace / "distilled"
    code, stdout, err = run_cli(
        capsys, "distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys),
        "--data", str(workspace / "data" / "*.txt"), "--seq-len", 16, "--batch-size", 2, "--lr", "1e-3",
        "--max_steps", 3, "--logging_steps", 1, "--save_strategy", "no", "--out", out, "--no-progress")
    assert code == 0, err
    record = json.loads((out / "slimlm_distill.json").read_text())
    # --max_steps and --logging_steps are TrainingArguments flags, not slimlm's.
    assert record["max_steps"] == 3
    assert sum("kd_loss" in entry for entry in record["log_history"]) == 3
    assert AutoModelForCausalLM.from_pretrained(out).num_parameters() == \
        AutoModelForCausalLM.from_pretrained(workspace / "pruned").num_parameters()

    code, _, err = run_cli(capsys, "distill", "--teacher", workspace / "teacher", "--student", workspace / "pruned",
                           "--data", workspace / "heldout.txt", "--not_a_flag", 1, "--out", workspace / "d2")
    assert code == 2 and err.strip().splitlines() == [
        "slimlm distill: error: unknown option(s) for distill: --not_a_flag 1 (not a slimlm or TrainingArguments flag)"]


def test_distill_resumes_only_the_run_its_checkpoints_belong_to(workspace, capsys, tmp_path):
    out = tmp_path / "distilled"
    common = ["distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys),
              "--seq-len", 16, "--batch-size", 2, "--max_steps", 2, "--save_steps", 1, "--out", out, "--no-progress"]
    assert run_cli(capsys, *common, "--data", str(workspace / "data" / "*.txt"))[0] == 0
    shutil.rmtree(out)  # the checkpoints stay: a rerun of the same command resumes them
    code, stdout, err = run_cli(capsys, *common, "--data", str(workspace / "data" / "*.txt"))
    assert code == 0, err
    assert f"resuming from {out}.checkpoints/checkpoint-2" in stdout
    shutil.rmtree(out)
    other = [*common, "--data", workspace / "heldout.txt", "--lr", "5e-3"]
    code, _, err = run_cli(capsys, *other)
    line = one_line_error(code, err, "distill")
    assert "belong to another run" in line and "learning_rate" in line and "train" in line
    code, stdout, err = run_cli(capsys, *other, "--overwrite")
    assert code == 0, err
    assert "deleting the checkpoints" in stdout and "resuming" not in stdout
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["steps"] == 2 and record["learning_rate"] == 5e-3


def test_bf16_training_is_refused_only_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    from slimlm.distill import training
    from slimlm.errors import InputError

    flags = ["--use_cpu", "true", "--bf16", "true"]
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    with pytest.raises(InputError, match="no AVX512-BF16 or AMX"):
        training.training_arguments(flags, output_dir=str(tmp_path))
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.training_arguments(flags, output_dir=str(tmp_path)).bf16


def test_distill_runs_unchanged_under_torchrun(workspace, capsys, tmp_path):
    """Two CPU processes (gloo): one global batch of 2 × 2 blocks per step, one checkpoint written."""
    student = pruned_dir(workspace, capsys)
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "slimlm",
         "distill", "--teacher", str(workspace / "teacher"), "--student", str(student), "--data",
         str(workspace / "heldout.txt"), "--seq-len", "16", "--batch-size", "2", "--max_steps", "2",
         "--save_strategy", "no", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["steps"] == 2 and record["tokens_seen"] == 2 * 2 * 16 * 2
    assert result.stdout.count("distilled model written") == 1
    AutoModelForCausalLM.from_pretrained(out)


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


# -------------------------------------------------------------- bad input
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


def test_runtime_failure_is_exit_1(workspace, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nwhile doing things")

    monkeypatch.setattr("slimlm.pipeline.importance.importance_stage", broken)
    code, _, err = run_cli(capsys, "importance", "--model", workspace / "teacher", "--data", workspace / "heldout.txt",
                           "--seq-len", 16, "--out", workspace / "s4")
    assert code == 1
    assert err.strip() == ("slimlm importance: error: RuntimeError: out of memory while doing things "
                           "(SLIMLM_DEBUG=1 shows the traceback)")


# ----------------------------------------------------------------- run
def write_recipe(workspace, name="recipe.yaml", **changes):
    recipe = {
        "teacher": "teacher", "out": "run", "seed": 0,
        "data": {"train": "data/*.txt", "heldout": "heldout.txt"},
        "importance": {"num_samples": 8, "seq_len": 16, "depth": ["block_influence"]},
        "target": {"target_params": 0.5},
        "synthetic": {"num_prompts": 3, "max_new_tokens": 4, "mix": 0.3},
        "distill": {"seq_len": 16, "batch_size": 4, "max_tokens": 256, "lr": 1e-3,
                    "training_args": {"save_steps": 2}},
        "eval": {"seq_len": 16, "max_blocks": 4, "prompts": ["the model"], "max_new_tokens": 3},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            recipe[section][field] = value
        else:
            recipe[section] = value
    path = workspace / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def stage_lines(out):
    return [line for line in out.splitlines() if line.startswith("[")]


def test_run_then_resume_after_a_deleted_stage(workspace, capsys):
    recipe = write_recipe(workspace)
    code, out, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    run = workspace / "run"
    for name in ("report/report.md", "report/report.html", "report/perplexity.png", "report/loss.png",
                 "report/importance.png", "eval.json", "synthetic.jsonl", "distilled/config.json"):
        assert (run / name).is_file(), name
    assert "running" in " ".join(stage_lines(out)) and "report:" in out
    markdown = (run / "report" / "report.md").read_text()
    assert "| teacher |" in markdown and "| pruned |" in markdown and "| distilled |" in markdown
    record = json.loads((run / "distilled" / "slimlm_distill.json").read_text())
    # 256 tokens at 4 blocks × 16 tokens per step: 4 steps.
    assert record["max_steps"] == 4
    # Every classic block trains, and the few synthetic blocks join (mix 0.3 cannot be reached).
    tokenizer = AutoTokenizer.from_pretrained(workspace / "teacher")
    classic = tokenize_blocks(load_texts(str(workspace / "data" / "*.txt")), tokenizer, 16)
    synthetic = tokenize_blocks(load_texts(run / "synthetic.jsonl"), tokenizer, 16)
    assert record["num_train_items"] == len(classic) + len(synthetic)

    code, out, _ = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0
    assert all("skipped" in line for line in stage_lines(out) if not line.startswith("[setup]"))

    # Deleting the pruned model reruns pruning only: pruning is deterministic, so the distilled
    # student (recorded against the pruned model's fingerprint) is still the right one.
    shutil.rmtree(run / "pruned")
    code, out, _ = run_cli(capsys, "run", recipe, "--no-progress")
    lines = stage_lines(out)
    assert code == 0
    assert any(line.startswith("[importance] skipped") for line in lines)
    assert any(line.startswith("[prune] running") for line in lines)
    assert any(line.startswith("[distill] skipped") for line in lines)

    shutil.rmtree(run / "distilled")
    code, out, _ = run_cli(capsys, "run", recipe, "--no-progress")
    lines = stage_lines(out)
    assert code == 0 and (run / "distilled" / "config.json").is_file()
    assert any(line.startswith("[distill] running") for line in lines)
    assert any(line.startswith("[synthetic] skipped") for line in lines)
    # The eval stage reruns: its record names the old distilled model.
    assert any(line.startswith("[eval] running") for line in lines)


def test_run_refuses_an_output_folder_of_another_recipe(workspace, capsys):
    first = write_recipe(workspace, "first.yaml", out="shared-run", synthetic=None,
                         distill__max_tokens=64)
    assert run_cli(capsys, "run", first, "--no-progress")[0] == 0
    second = write_recipe(workspace, "second.yaml", out="shared-run", synthetic=None, distill__max_tokens=128)
    code, _, err = run_cli(capsys, "run", second, "--no-progress")
    assert code == 2 and "another recipe; pass --overwrite" in err


def test_run_reruns_every_stage_whose_inputs_changed_in_place(workspace, capsys, tmp_path):
    """Rewritten training data, then a teacher whose weights were replaced in place: the stages
    that read them run again, stale checkpoints are deleted rather than resumed, and the
    synthetic records come from the new teacher."""
    from slimlm.fingerprint import model_fingerprint

    project = tmp_path / "project"
    shutil.copytree(workspace / "teacher", project / "teacher")
    shutil.copytree(workspace / "data", project / "data")
    shutil.copy(workspace / "heldout.txt", project / "heldout.txt")
    recipe = write_recipe(project)
    assert run_cli(capsys, "run", recipe, "--no-progress")[0] == 0

    (project / "data" / "train0.txt").write_text("\n\n".join(sentences(12, 1234)))
    code, out, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    lines = stage_lines(out)
    for stage in ("importance", "synthetic", "distill"):
        assert any(line.startswith(f"[{stage}] running") for line in lines), (stage, lines)
    assert any(line.startswith("[distill] deleting the checkpoints") for line in lines)

    tokenizer = word_tokenizer()
    replacement = tiny_model("llama", "training", seed=7, vocab_size=len(tokenizer), hidden_size=64,
                             intermediate_size=128, num_hidden_layers=2)
    replacement.save_pretrained(project / "teacher")
    code, out, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    lines = stage_lines(out)
    for stage in ("importance", "prune", "synthetic", "distill", "eval"):
        assert any(line.startswith(f"[{stage}] running") for line in lines), (stage, lines)
    assert not any("resuming" in line for line in lines)
    records = [json.loads(line) for line in (project / "run" / "synthetic.jsonl").read_text().splitlines()]
    assert {r["teacher"]["fingerprint"] for r in records} == {model_fingerprint(replacement)}
    code, out, _ = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0 and all("skipped" in line for line in stage_lines(out) if not line.startswith("[setup]"))


def test_a_failed_overwrite_of_a_run_loses_no_finished_result(workspace, capsys, tmp_path, monkeypatch):
    out = tmp_path / "replaced-run"
    first = write_recipe(workspace, "keep.yaml", out=str(out), synthetic=None, distill__max_tokens=64)
    assert run_cli(capsys, "run", first, "--no-progress")[0] == 0
    finished = (out / "report" / "report.md").read_text()
    second = write_recipe(workspace, "replace.yaml", out=str(out), synthetic=None, distill__max_tokens=128)
    real_distill = distill_step.distill_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_step, "distill_stage", interrupted)
    assert run_cli(capsys, "run", second, "--overwrite", "--no-progress")[0] == 130
    kept = tmp_path / ".replaced-run.slimlm-old"
    assert (kept / "report" / "report.md").read_text() == finished
    monkeypatch.setattr(distill_step, "distill_stage", real_distill)
    code, stdout, err = run_cli(capsys, "run", second, "--no-progress")  # resumes the replacement
    assert code == 0, err
    assert "[prune] skipped" in stdout and not kept.exists()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["distill"]["max_tokens"] == 128


@pytest.mark.parametrize("change, message", [
    ({"importance__num_samples": "many"}, "importance.num_samples: expected an integer, got str 'many'"),
    ({"distill__lr": -1.0}, "distill.lr must be > 0"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"target": {"hidden_sise": 3}}, "target: unknown target field(s) hidden_sise"),
    ({"importance__depth": ["bogus"]}, "importance.depth: unknown value 'bogus'"),
    ({"data": {"heldout": "heldout.txt"}}, "data.train is required"),
])
def test_recipe_errors_name_the_file_and_field(workspace, capsys, change, message):
    recipe = write_recipe(workspace, "bad.yaml")
    raw = yaml.safe_load(recipe.read_text())
    for key, value in change.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    recipe.write_text(yaml.safe_dump(raw))
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 2
    assert err.strip() == f"slimlm run: error: {recipe}: {message}" or (message in err and str(recipe) in err)


def test_run_checks_the_target_before_any_work(workspace, capsys):
    recipe = write_recipe(workspace, "huge.yaml", out="huge-run", target={"target_params": "10B"})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "larger than the model" in err
    assert not (workspace / "huge-run" / "scores").exists()


def test_recipe_that_is_not_yaml(workspace, capsys):
    path = workspace / "broken.yaml"
    path.write_text("teacher: [unclosed\n")
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and f"{path}: not valid YAML" in err
    code, _, err = run_cli(capsys, "run", workspace / "absent.yaml")
    assert code == 2 and "absent.yaml does not exist" in err


# ---------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_quick_on_the_real_model(tmp_path):
    pytest.importorskip("gguf")
    result = subprocess.run([sys.executable, "-m", "slimlm", "demo", "--quick", "--out", str(tmp_path / "demo"),
                             "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = {r["name"]: r for r in json.loads((tmp_path / "demo" / "eval.json").read_text())["results"]}
    assert evaluation["pruned"]["params"] < 0.55 * evaluation["teacher"]["params"]
    # Even the smoke-test budget must recover part of what pruning broke.
    assert evaluation["distilled"]["perplexity"] < evaluation["pruned"]["perplexity"]
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    assert "report:" in result.stdout


# -------------------------------------------------------- demo corpus
def test_package_docs_corpus_is_deterministic_and_split_by_file(tmp_path, monkeypatch):
    from slimlm.pipeline.corpus import collect_package_docs, write_corpus

    package = tmp_path / "site" / "docpkg"
    package.mkdir(parents=True)
    for index in range(40):
        body = " ".join(sentences(30, index))
        (package / f"mod{index}.py").write_text(f'"""Module {index}. {body}"""\n\ndef f():\n    """Function {index}."""\n')
    (package / "README.md").write_text("# docpkg\n\n" + " ".join(sentences(40, 1000)))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    first = collect_package_docs(train_chars=6000, heldout_chars=1000, packages=("docpkg",), heldout_every=5,
                                 min_chars=100, progress=False)
    second = collect_package_docs(train_chars=6000, heldout_chars=1000, packages=("docpkg",), heldout_every=5,
                                  min_chars=100, progress=False)
    assert first == second
    assert sum(map(len, first["train"])) >= 6000 and sum(map(len, first["heldout"])) >= 1000
    # A file's text is in one split only.
    assert not set(first["sources"]["train"]) & set(first["sources"]["heldout"])
    assert any(text.startswith("Module") and "Function" in text for text in first["train"])
    paths = write_corpus(first, tmp_path / "corpus")
    assert load_texts(paths["heldout"]) == first["heldout"]
    # Less text than asked is used as it is; too little to train on is an error.
    everything = collect_package_docs(train_chars=10**9, heldout_chars=10**9, packages=("docpkg",), heldout_every=5,
                                      min_chars=100, progress=False)
    assert len(everything["train"]) + len(everything["heldout"]) == 41
    (tmp_path / "site" / "tinydoc").mkdir()
    (tmp_path / "site" / "tinydoc" / "__init__.py").write_text('"""' + "word " * 40 + '"""\n')
    with pytest.raises(ValueError, match="hold only"):
        collect_package_docs(train_chars=10**6, heldout_chars=10, packages=("tinydoc",), min_chars=100,
                             progress=False)
    with pytest.raises(ValueError, match="none of the packages"):
        collect_package_docs(train_chars=10, heldout_chars=10, packages=("no_such_package_here",), progress=False)


# ------------------------------------------- outputs never touch inputs
def one_line_error(code, err, command):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"slimlm {command}: error: "), err
    return lines[0]


def tree(folder):
    return sorted((os.path.relpath(os.path.join(root, name), folder), os.path.getsize(os.path.join(root, name)))
                  for root, _, files in os.walk(folder) for name in files)


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


def test_generate_overwrite_checks_every_input_before_replacing_the_output(workspace, capsys, tmp_path):
    out = tmp_path / "synthetic.jsonl"
    args = ["generate", "--teacher", workspace / "teacher", "--max-new-tokens", 3, "--num-prompts", 2, "--out", out,
            "--no-progress"]
    assert run_cli(capsys, *args, "--from-data", workspace / "heldout.txt")[0] == 0
    finished, marker = out.read_bytes(), (tmp_path / "synthetic.jsonl.done.json").read_bytes()
    broken = tmp_path / "prompts.jsonl"
    broken.write_text('{"prompt": "the model"}\n{"no prompt": 1}\n{"prompt": "a layer"}\n')
    code, _, err = run_cli(capsys, *args, "--prompts", broken, "--overwrite")
    assert "record 2 has no string field 'prompt'" in one_line_error(code, err, "generate")
    assert out.read_bytes() == finished and (tmp_path / "synthetic.jsonl.done.json").read_bytes() == marker
    broken.write_text('{"prompt": "the model is small ."}\n')
    assert run_cli(capsys, *args, "--prompts", broken, "--overwrite")[0] == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["the model is small ."]
    assert sorted(os.listdir(tmp_path)) == ["prompts.jsonl", "synthetic.jsonl", "synthetic.jsonl.done.json"]


def test_an_interrupted_generate_is_continued_and_a_stale_partial_discarded(workspace, capsys, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "synthetic.jsonl"
    args = ["generate", "--teacher", workspace / "teacher", "--from-data", workspace / "heldout.txt",
            "--max-new-tokens", 3, "--num-prompts", 3, "--out", out, "--no-progress"]
    from slimlm.distill import generate

    real_generate = generate.generate_synthetic

    def killed_before_the_swap(*a, **k):
        real_generate(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_synthetic", killed_before_the_swap)
    assert run_cli(capsys, *args)[0] == 130
    assert not out.exists() and (tmp_path / ".synthetic.jsonl.slimlm-new").is_file()
    monkeypatch.setattr(generate, "generate_synthetic", real_generate)
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "continuing the partial" in stdout, err
    out.unlink()
    (tmp_path / "synthetic.jsonl.done.json").unlink()
    monkeypatch.setattr(generate, "generate_synthetic", killed_before_the_swap)
    assert run_cli(capsys, *args)[0] == 130
    monkeypatch.setattr(generate, "generate_synthetic", real_generate)
    code, stdout, err = run_cli(capsys, *args, "--temperature", "0.5")
    assert code == 0 and "discarding" in stdout, err
    assert {json.loads(line)["sampling"]["temperature"] for line in out.read_text().splitlines()} == {0.5}
    assert sorted(os.listdir(tmp_path)) == ["synthetic.jsonl", "synthetic.jsonl.done.json"]


# ------------------------------------------------------ custom model code
def model_with_custom_code(folder, workspace, model_type):
    shutil.copytree(workspace / "teacher", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    marker = folder.parent / f"{folder.name}-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    return marker


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


# ------------------------------------------------------------ bad files
def damaged_model(workspace, folder, damage):
    shutil.copytree(workspace / "teacher", folder)
    weights = folder / "model.safetensors"
    if damage == "corrupt weights":
        weights.write_bytes(b"\x00garbage" * 64)
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "invalid config":
        (folder / "config.json").write_text('{"model_type": "llama", ')
    elif damage == "no weights":
        weights.unlink()


@pytest.mark.parametrize("damage", ["corrupt weights", "truncated weights", "invalid config", "no weights"])
def test_a_damaged_model_is_bad_input(workspace, capsys, tmp_path, damage):
    folder = tmp_path / "model"
    damaged_model(workspace, folder, damage)
    code, _, err = run_cli(capsys, "plan", "--model", folder, "--target-params", "0.5")
    assert f"model {folder}" in one_line_error(code, err, "plan")


def test_truncated_scores_are_bad_input(workspace, capsys, tmp_path):
    scores = tmp_path / "scores"
    shutil.copytree(scores_dir(workspace, capsys), scores)
    data = (scores / "scores.safetensors").read_bytes()
    (scores / "scores.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--scores", scores, "--target-params",
                           "0.5", "--out", tmp_path / "pruned")
    assert f"scores {scores}" in one_line_error(code, err, "prune")
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize("value, message", [
    ("inf", "expected a fraction in (0, 1] or a parameter count"), ("nan", "expected a fraction"),
    ("1.5", "a fraction must be in (0, 1] and a count a whole number"),
    ("2", "asks for 2 parameters: cannot reach that"), ("0", "expected a fraction"),
])
def test_target_params_that_are_neither_a_fraction_nor_a_reachable_count(workspace, capsys, value, message):
    code, _, err = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", value)
    assert message in one_line_error(code, err, "plan")


def test_an_infinite_recipe_target_claims_nothing(workspace, capsys, tmp_path):
    recipe = write_recipe(workspace, "inf.yaml", out=str(tmp_path / "run"), target={"target_params": float("inf")})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert "target_params must be a positive finite" in one_line_error(code, err, "run")
    assert not (tmp_path / "run").exists()


def test_run_checks_everything_before_writing_recipe_yaml(workspace, capsys, tmp_path):
    """A run that cannot start leaves no recipe.yaml, so the corrected recipe is not refused."""
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "late.yaml", out=str(out), data={"train": "data/*.txt", "heldout": "nothing.txt"})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert "nothing.txt" in one_line_error(code, err, "run")
    assert not out.exists()


def test_run_never_clears_a_folder_holding_its_inputs(workspace, capsys, tmp_path):
    copy = tmp_path / "project"
    shutil.copytree(workspace / "teacher", copy / "teacher")
    shutil.copytree(workspace / "data", copy / "data")
    shutil.copy(workspace / "heldout.txt", copy / "heldout.txt")
    recipe = write_recipe(copy, out=".")
    before = tree(copy)
    code, _, err = run_cli(capsys, "run", recipe, "--overwrite", "--no-progress")
    assert "output folder" in one_line_error(code, err, "run") and "contains the" in err
    assert tree(copy) == before


# --------------------------------------------------------------- smaller
def test_drop_layers_and_max_minutes_refuse_empty_and_zero(workspace, capsys):
    for argv in (["prune", "--model", str(workspace / "teacher"), "--drop-layers", ",", "--out", "x"],
                 ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o", "--max-minutes", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_plan_counts_the_bytes_of_the_dtype_it_loaded(workspace, capsys):
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5")
    assert code == 0 and "at 4 bytes/parameter" in out  # auto is float32 on CPU
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5",
                           "--dtype", "bfloat16")
    assert code == 0 and "at 2 bytes/parameter" in out


def test_eval_json_into_a_folder_fails_before_any_work(workspace, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("slimlm.evaluate.evaluate_model", lambda *a, **k: pytest.fail("evaluated first"))
    code, _, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--data", workspace / "heldout.txt",
                           "--json", tmp_path)
    assert "is a folder" in one_line_error(code, err, "eval")
    assert os.listdir(tmp_path) == []


def test_bad_distill_settings_write_nothing(workspace, capsys, tmp_path):
    for flag, value in (("--lr", "-1"), ("--temperature", "0"), ("--beta", "2")):
        code, _, err = run_cli(capsys, "distill", "--teacher", workspace / "teacher", "--student",
                               pruned_dir(workspace, capsys), "--data", workspace / "heldout.txt", flag, value,
                               "--out", tmp_path / "out")
        assert flag in one_line_error(code, err, "distill")
    assert os.listdir(tmp_path) == []


def test_pruned_folders_are_readable_like_any_other(workspace, capsys):
    umask = os.umask(0)
    os.umask(umask)
    for folder in (pruned_dir(workspace, capsys), scores_dir(workspace, capsys)):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask
