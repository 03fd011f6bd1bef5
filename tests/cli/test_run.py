"""``slimlm run``: the whole pipeline from a recipe, resuming stage by stage, rerunning what
changed, and refusing a bad recipe before anything is written."""
import json
import os
import shutil

import pytest
import yaml
from transformers import AutoTokenizer

from slimlm.data import load_texts, tokenize_blocks
from slimlm.pipeline import distill as distill_step
from tests.tiny import tiny_model, word_tokenizer

from .helpers import one_line_error, run_cli, sentences, stage_lines, tree, write_recipe


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
    # The teacher's top-k of its own text was kept while it sampled: those blocks train from the
    # cache, in a mix drawn batch by batch for the run's steps (max_steps × 4 blocks).
    assert (run / "synthetic.jsonl.topk" / "data" / "manifest.json").is_file()
    assert set(record["inputs"]["synthetic_caches"]) == {"data"}
    assert record["num_train_items"] == record["max_steps"] * 4

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
    finished = tree(out)
    second = write_recipe(workspace, "replace.yaml", out=str(out), synthetic=None, distill__max_tokens=128)
    real_distill = distill_step.distill_stage

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    # A failure after the finished run was set aside puts it back, whole.
    monkeypatch.setattr(distill_step, "distill_stage", interrupted)
    assert run_cli(capsys, "run", second, "--overwrite", "--no-progress")[0] == 130
    kept = tmp_path / ".replaced-run.slimlm-old"
    assert tree(out) == finished and not kept.exists()
    # A run killed outright leaves the finished run aside: rerunning its recipe puts it back.
    os.rename(out, kept)
    shutil.copytree(kept, out)
    (out / "recipe.yaml").write_text(yaml.safe_dump({**yaml.safe_load((kept / "recipe.yaml").read_text()), "seed": 1}))
    monkeypatch.setattr(distill_step, "distill_stage", real_distill)
    code, stdout, err = run_cli(capsys, "run", first, "--no-progress")
    assert code == 0 and "putting back the finished run" in stdout, err
    assert all("skipped" in line for line in stage_lines(stdout) if not line.startswith("[setup]"))
    assert tree(out) == finished and not kept.exists()
    code, stdout, err = run_cli(capsys, "run", second, "--overwrite", "--no-progress")
    assert code == 0, err
    assert yaml.safe_load((out / "recipe.yaml").read_text())["distill"]["max_tokens"] == 128 and not kept.exists()


def test_run_overwrite_checks_every_stage_setting_before_setting_a_run_aside(workspace, capsys, tmp_path):
    out = tmp_path / "rr"
    first = write_recipe(workspace, "rr.yaml", out=str(out), distill__max_tokens=64)
    assert run_cli(capsys, "run", first, "--no-progress")[0] == 0
    finished = tree(out)
    for name, change, message in (
            ("long.yaml", {"synthetic__max_new_tokens": 1000}, "exceeds the teacher's context"),
            ("empty.yaml", {"distill__training_args": {"gradient_accumulation_steps": -3}},
             "--gradient_accumulation_steps must be > 0"),
            ("dir.yaml", {"distill__training_args": {"output_dir": str(workspace / "teacher")}},
             "--output_dir cannot be passed through")):
        recipe = write_recipe(workspace, name, out=str(out), distill__max_tokens=64, **change)
        code, _, err = run_cli(capsys, "run", recipe, "--overwrite", "--no-progress")
        assert message in one_line_error(code, err, "run")
        assert tree(out) == finished and not (tmp_path / ".rr.slimlm-old").exists()


@pytest.mark.parametrize("change, message", [
    ({"importance__num_samples": "many"}, "importance.num_samples: expected an integer, got str 'many'"),
    ({"distill__lr": -1.0}, "distill.lr must be > 0"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"target": {"hidden_sise": 3}}, "target: unknown target field(s) hidden_sise"),
    ({"importance__depth": ["bogus"]}, "importance.depth: unknown value 'bogus'"),
    ({"data": {"heldout": "heldout.txt"}}, "data.train is required"),
    ({"save_dtype": "int8"}, "save_dtype: unknown value 'int8'"),
    ({"eval__speed": "yes"}, "eval.speed: expected true/false, got str 'yes'"),
    ({"eval__speed_new_tokens": 1}, "eval.speed_new_tokens must be >= 2"),
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


def test_recipe_that_is_not_yaml(workspace, capsys):
    path = workspace / "broken.yaml"
    path.write_text("teacher: [unclosed\n")
    code, _, err = run_cli(capsys, "run", path)
    assert code == 2 and f"{path}: not valid YAML" in err
    code, _, err = run_cli(capsys, "run", workspace / "absent.yaml")
    assert code == 2 and "absent.yaml does not exist" in err


def test_run_checks_the_target_before_any_work(workspace, capsys):
    recipe = write_recipe(workspace, "huge.yaml", out="huge-run", target={"target_params": "10B"})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and "larger than the model" in err
    assert not (workspace / "huge-run" / "scores").exists()


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


def test_run_saves_in_save_dtype_and_reports_speed(workspace, capsys, tmp_path):
    """save_dtype reaches both checkpoints and their records' inputs (so a changed value reruns
    those stages); eval.speed adds speed.json and the report's speed section; a rerun skips
    every stage."""
    import torch
    from safetensors import safe_open

    def dtypes(folder):
        with safe_open(folder / "model.safetensors", "pt") as handle:
            return {handle.get_tensor(name).dtype for name in handle.keys()}

    out = tmp_path / "run"
    recipe = write_recipe(workspace, "speed.yaml", out=str(out), synthetic=None, save_dtype="bfloat16",
                          eval__speed=True, eval__speed_prompt_tokens=8, eval__speed_new_tokens=3, eval__speed_rounds=1)
    code, stdout, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert dtypes(out / "pruned") == dtypes(out / "distilled") == {torch.bfloat16}
    for record in ("pruned/slimlm_prune.json", "distilled/slimlm_distill.json"):
        assert json.loads((out / record).read_text())["inputs"]["save_dtype"] == "bfloat16", record
    speed = json.loads((out / "speed.json").read_text())["report"]
    assert list(speed["models"]) == ["teacher", "distilled"] and set(speed["models"]["teacher"]["batch"]) == {"1", "8"}
    markdown = (out / "report" / "report.md").read_text()
    assert "## Inference speed" in markdown and "decode tok/s" in markdown and "bfloat16 safetensors" in markdown
    assert (out / "report" / "speed.png").is_file()
    code, stdout, _ = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0 and all("skipped" in line for line in stage_lines(stdout) if not line.startswith("[setup]"))
    code, stdout, err = run_cli(capsys, "run", recipe, "--save-dtype", "float32", "--overwrite", "--no-progress")
    assert code == 0, err
    assert dtypes(out / "pruned") == dtypes(out / "distilled") == {torch.float32}


def test_run_evaluates_and_reports_a_general_held_out_set(workspace, capsys, tmp_path):
    general = tmp_path / "general.txt"
    general.write_text("\n\n".join(sentences(8, 123)))
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "general.yaml", out=str(out), synthetic=None,
                          data={"train": "data/*.txt", "heldout": "heldout.txt", "general": str(general)},
                          distill__eval_steps=2, distill__eval_blocks=2)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "[distill] step 2: held-out perplexity heldout " in printed and ", general " in printed
    # Both held-out sets scored along the distillation: every 2 steps and after the last (4 steps).
    history = json.loads((out / "distilled" / "slimlm_distill.json").read_text())["log_history"]
    evals = [entry for entry in history if "heldout_nll" in entry]
    assert [entry["step"] for entry in evals] == [2, 4] and all(entry["general_nll"] > 0 for entry in evals)
    assert (out / "report" / "loss.png").is_file()
    results = json.loads((out / "eval.json").read_text())["results"]
    assert [result["name"] for result in results] == ["teacher", "pruned", "distilled"]
    assert all(result["general_perplexity"] > 1 and result["general_perplexity"] != result["perplexity"]
               for result in results)
    report = (out / "report" / "report.md").read_text()
    assert "general ppl" in report and "general vs first" in report and "1.00×" in report
    # Another general set is another evaluation: eval reruns, the trained stages do not.
    general.write_text("\n\n".join(sentences(8, 321)))
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    lines = stage_lines(printed)
    assert any(line.startswith("[eval] running") for line in lines)
    assert any(line.startswith("[distill] skipped") for line in lines)


def test_run_corrects_the_teacher_and_takes_distillation_options(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "correct.yaml", out=str(out), synthetic=None,
                          correct_teacher={"tokens": 64}, distill__hidden_loss_weight=1.0,
                          distill__hidden_loss_schedule="minitron", distill__teacher_precision="float32",
                          distill__student_precision="float32", distill__fit_to_time=True, distill__max_minutes=30,
                          distill__freeze_embeddings=True)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "[correct_teacher] fine-tuning the teacher" in printed
    assert (out / "teacher-corrected" / "config.json").is_file()
    inputs = json.loads((out / "distilled" / "slimlm_distill.json").read_text())["inputs"]
    assert inputs["teacher_correction"]["tokens"] == 64
    assert "--bf16" not in inputs["teacher_correction"]["training_args"]  # the student's precision: float32
    assert inputs["distillation_options"]["hidden_loss_schedule"] == "minitron"
    assert inputs["fit_to_time"] is True and inputs["student_precision"] == "float32"
    assert inputs["distillation_options"]["freeze_embeddings"] is True
    history = json.loads((out / "distilled" / "slimlm_distill.json").read_text())["log_history"]
    assert any("hidden_loss" in entry for entry in history)
    report = (out / "report" / "report.md").read_text()
    assert "from the teacher corrected on 64 tokens" in report and "hidden-state loss 1.0 (minitron)" in report
    assert "schedule fitted to the time" in report and "student precision float32 (float32)" in report
    assert "embeddings and LM head frozen" in report
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "holds the teacher corrected on these inputs" in printed
    assert any(line.startswith("[distill] skipped") for line in stage_lines(printed))


@pytest.mark.parametrize("dynamic", [False, True])
def test_run_mixes_each_training_file_as_its_own_source(workspace, capsys, tmp_path, dynamic):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "sources.yaml", out=str(out), distill__corpus_sources=True,
                          distill__corpus_weights="train0=1,train1=1,train2=1,train3=1", distill__dynamic_mix=dynamic,
                          distill__mix_every=1, distill__mix_heldout_blocks=1)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "[distill] the corpus's sources: train0 " in printed
    record = json.loads((out / "distilled" / "slimlm_distill.json").read_text())
    assert record["inputs"]["corpus_sources"] == "train0=1,train1=1,train2=1,train3=1"
    # The corpus's four files share what the teacher-written text (synthetic.mix 0.3) leaves.
    first = record["data_mix"][0]
    assert first["from_batch"] == 0 and sorted(first["weights"]) == [
        "corpus/train0", "corpus/train1", "corpus/train2", "corpus/train3", "synthetic/data"]
    assert all(first["weights"][f"corpus/train{index}"] == pytest.approx(0.7 / 4) for index in range(4))
    report = (out / "report" / "report.md").read_text()
    if dynamic:
        assert len(record["data_mix"]) == record["steps"]  # an update after every step but the last
        assert "- **data mix**: dynamic, " in report and "mix.png" in report
    else:
        assert len(record["data_mix"]) == 1 and "mix.png" not in report
        assert "- **data mix**: static: corpus/train0 0.175, corpus/train1 0.175, corpus/train2 0.175, " in report


def test_shards_without_each_tokens_source_are_written_again_for_a_mix_of_sources(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "one.yaml", out=str(out), synthetic=None, distill__corpus_sources=True)
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    manifest_path = out / "tokens" / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:  # as an older slimlm wrote them
        del shard["sources"]
    manifest_path.write_text(json.dumps(manifest))
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "[tokenize] running (tokens: train: token shards" in printed
    assert "do not record which data source each token came from" in printed
    assert all("sources" in shard for shard in json.loads(manifest_path.read_text())["shards"])


@pytest.mark.parametrize("writer", ["corrected", "original"])
def test_the_corrected_teacher_writes_the_synthetic_text(workspace, capsys, tmp_path, writer):
    from slimlm.fingerprint import model_fingerprint
    from slimlm.models import load_model

    out = tmp_path / "run"
    recipe = write_recipe(workspace, f"writer-{writer}.yaml", out=str(out),
                          correct_teacher={"tokens": 256, "lr": 0.01},
                          synthetic={"num_prompts": 3, "max_new_tokens": 4, "mix": 0.3, "filters": False,
                                     "keep_topk": 8, "writer": writer},
                          distill__teacher_precision="float32", distill__student_precision="float32")
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    stages = [line.split("]")[0][1:] for line in stage_lines(printed) if " running" in line or "skipped" in line]
    assert stages.index("correct_teacher") < stages.index("synthetic")
    written_by = json.loads((out / "synthetic.jsonl.done.json").read_text())["inputs"]["teacher"]
    corrected = model_fingerprint(load_model(str(out / "teacher-corrected")))
    original = model_fingerprint(load_model(str(workspace / "teacher")))
    assert corrected != original
    assert written_by == (corrected if writer == "corrected" else original)


@pytest.mark.parametrize("synthetic, message", [
    ({"engine": "vllm", "server": "http://127.0.0.1:9"}, "synthetic.server serves the teacher it was started with"),
    ({"engine": "vllm", "engine_args": "{nope"}, "synthetic.engine_args is not JSON"),
    ({"engine_args": '{"enforce_eager": true}'}, "synthetic.engine_args applies to synthetic.engine vllm only"),
])
def test_vllm_generation_settings_are_checked_before_any_work(workspace, capsys, tmp_path, synthetic, message):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "bad-vllm.yaml", out=str(out), correct_teacher={"tokens": 64},
                          synthetic={"num_prompts": 3, "max_new_tokens": 4, **synthetic})
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert message in one_line_error(code, err, "run") and not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"distill__hidden_loss_schedule": "sometimes"}, "distill.hidden_loss_schedule: unknown value 'sometimes'"),
    ({"distill__on_policy_fraction": 1.5}, "distill.on_policy_fraction must be in [0, 1]"),
    ({"distill__freeze_embeddings": "yes"}, "distill.freeze_embeddings: expected true/false"),
    ({"distill__teacher_precision": "int4"}, "distill.teacher_precision: unknown value 'int4'"),
    ({"distill__student_precision": "fp16"}, "distill.student_precision: unknown value 'fp16'"),
    ({"distill__teacher_precision": "bf16"}, "distill.teacher_precision: unknown value 'bf16' (known: auto, float32, "
                                             "bfloat16, int8; bf16 is now bfloat16)"),
    ({"distill__fit_to_time": True, "distill__max_minutes": None}, "distill.fit_to_time fits the schedule"),
    ({"distill__corpus_weights": "train0=1"}, "distill.corpus_weights weighs the corpus's sources: set "
                                              "distill.corpus_sources too"),
    ({"distill__corpus_sources": True, "distill__corpus_weights": "train0=1"},
     "distill.corpus_weights must name exactly the corpus's sources (train0, train1, train2, train3): missing "
     "train1, train2, train3"),
    ({"correct_teacher": {"tokens": 0}}, "correct_teacher.tokens must be > 0"),
    ({"correct_teacher": {"lr": 0.1}}, "correct_teacher.tokens is required"),
])
def test_recovery_options_are_checked_before_any_work(workspace, capsys, tmp_path, change, message):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "bad-options.yaml", out=str(out), synthetic=None, **change)
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"distill__finish_by_minutes": 0}, "distill.finish_by_minutes must be > 0 and finite"),
    ({"distill__finish_by_minutes": float("inf")}, "distill.finish_by_minutes must be > 0 and finite"),
    ({"distill__max_minutes": float("nan")}, "distill.max_minutes must be > 0 and finite"),
])
def test_time_budgets_are_checked_before_any_work(workspace, capsys, tmp_path, change, message):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "bad-time.yaml", out=str(out), synthetic=None, **change)
    code, _, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 2 and message in err, err
    assert not out.exists()


def test_finish_by_minutes_caps_distillation_from_the_run_start(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "finish-by.yaml", out=str(out), synthetic=None,
                          distill__finish_by_minutes=30, distill__fit_to_time=True)
    code, printed, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    capped = [line for line in stage_lines(printed) if "finish_by_minutes 30" in line]
    assert len(capped) == 1 and "distillation capped at " in capped[0], printed
    record = json.loads((out / "distilled" / "slimlm_distill.json").read_text())
    assert 29 < record["max_minutes"] <= 30
    assert "finish_by_minutes" not in json.dumps(record["inputs"])  # a cap, not an input of the result
    assert "(finish_by_minutes 30)" in (out / "report" / "report.md").read_text()


@pytest.mark.parametrize("max_minutes, finish_by, elapsed, expected, says", [
    (15.0, None, 20.0, 15.0, None),            # no finish_by: max_minutes as it is
    (15.0, 25.0, 5.0, 15.0, None),             # time enough: max_minutes, nothing said
    (15.0, 25.0, 14.0, 11.0, "capped at 11.0 min (max_minutes 15)"),
    (15.0, 25.0, 24.8, 1.0, "0.2 left, at least 1.0"),  # the earlier stages overran
    (None, 25.0, 14.0, 11.0, "capped at 11.0 min"),
])
def test_distill_minutes_follow_finish_by(max_minutes, finish_by, elapsed, expected, says):
    import time

    from slimlm.pipeline.distill import distill_minutes

    lines = []
    minutes = distill_minutes({"max_minutes": max_minutes, "finish_by_minutes": finish_by},
                              time.monotonic() - elapsed * 60, lines.append)
    assert minutes == pytest.approx(expected, abs=0.01)
    assert (says is None) == (not lines) and (says is None or says in lines[0]), lines
