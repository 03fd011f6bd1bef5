"""``slimlm distill``: TrainingArguments flags pass through, checkpoints resume only their own
run, bad settings write nothing, and the same command runs under torchrun."""
import json
import os
import shutil
import subprocess
import sys

from transformers import AutoModelForCausalLM

from .helpers import one_line_error, pruned_dir, run_cli


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


def test_distill_with_frozen_embeddings_trains_all_but_them(workspace, capsys, tmp_path):
    import torch

    out, student = tmp_path / "distilled", pruned_dir(workspace, capsys)
    common = ["distill", "--teacher", workspace / "teacher", "--student", student, "--data",
              str(workspace / "data" / "*.txt"), "--seq-len", 16, "--batch-size", 2, "--lr", "1e-2", "--max_steps", 2,
              "--save_steps", 1, "--out", out, "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--freeze-embeddings")
    assert code == 0, err
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["distillation"]["freeze_embeddings"] is True
    assert record["inputs"]["distillation_options"] == {"freeze_embeddings": True}
    before = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.embed_tokens.weight" not in changed and "lm_head.weight" not in changed
    assert any(name.endswith("mlp.down_proj.weight") for name in changed)
    # The same command without the flag is another run: its checkpoints are not resumed.
    shutil.rmtree(out)
    code, _, err = run_cli(capsys, *common)
    assert "belong to another run" in one_line_error(code, err, "distill")


def test_bad_distill_settings_write_nothing(workspace, capsys, tmp_path):
    for flag, value in (("--lr", "-1"), ("--temperature", "0"), ("--beta", "2")):
        code, _, err = run_cli(capsys, "distill", "--teacher", workspace / "teacher", "--student",
                               pruned_dir(workspace, capsys), "--data", workspace / "heldout.txt", flag, value,
                               "--out", tmp_path / "out")
        assert flag in one_line_error(code, err, "distill")
    assert os.listdir(tmp_path) == []


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


def test_distill_saves_the_student_in_save_dtype_and_checkpoints_in_the_training_dtype(workspace, capsys, tmp_path):
    import torch
    from safetensors import safe_open

    def dtypes(path):
        with safe_open(path, "pt") as handle:
            return {handle.get_tensor(name).dtype for name in handle.keys()}

    out = tmp_path / "distilled"
    common = ["distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys),
              "--data", workspace / "heldout.txt", "--seq-len", 16, "--batch-size", 2, "--max_steps", 2,
              "--save_steps", 2, "--out", out, "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--save-dtype", "bfloat16")
    assert code == 0, err
    assert dtypes(out / "model.safetensors") == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "slimlm_distill.json").read_text())["inputs"]["save_dtype"] == "bfloat16"
    assert dtypes(tmp_path / "distilled.checkpoints" / "checkpoint-2" / "model.safetensors") == {torch.float32}
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"  # readable by transformers 4.x
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.dtype == torch.bfloat16

    # The checkpoints do not depend on the saved dtype: another save dtype resumes them. auto is the
    # student's source dtype (the tiny pruned model is a float32 checkpoint).
    shutil.rmtree(out)
    code, stdout, err = run_cli(capsys, *common)
    assert code == 0, err
    assert f"resuming from {out}.checkpoints/checkpoint-2" in stdout
    assert dtypes(out / "model.safetensors") == {torch.float32}
