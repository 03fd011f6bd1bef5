"""``slimlm distill --correct-teacher-tokens N``: the teacher is fine-tuned first and saved beside
the output, a rerun reuses it, and N is part of the run, so another N never resumes this
run's checkpoints."""
import json
import shutil

import pytest

from slimlm.distill.training import cpu_has_bf16

from .helpers import one_line_error, pruned_dir, run_cli


def test_teacher_correction_runs_first_is_reused_and_is_part_of_the_run(workspace, capsys, tmp_path):
    out = tmp_path / "distilled"
    common = ["distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys),
              "--data", str(workspace / "data" / "*.txt"), "--seq-len", 16, "--batch-size", 2, "--max_steps", 2,
              "--save_steps", 1, "--out", out, "--no-progress"]
    code, stdout, err = run_cli(capsys, *common, "--correct-teacher-tokens", 64, "--lr", "1e-3")
    assert code == 0, err
    corrected = tmp_path / "distilled.teacher-corrected"
    record = json.loads((corrected / "slimlm_stage.json").read_text())
    assert record["inputs"]["tokens"] == 64 and record["inputs"]["learning_rate"] == 1e-4  # a tenth of --lr
    assert record["steps"] == 2  # ⌈64 / (2 · 16)⌉
    # --student-precision auto: the correction trains in bf16 mixed precision where bf16 is native
    assert ("--bf16" in record["inputs"]["training_args"]) == cpu_has_bf16()
    assert "fine-tuning the teacher for 2 steps" in stdout
    distill_inputs = json.loads((out / "slimlm_distill.json").read_text())["inputs"]
    assert distill_inputs["teacher_correction"] == record["inputs"]

    shutil.rmtree(out)
    code, stdout, err = run_cli(capsys, *common, "--correct-teacher-tokens", 64, "--lr", "1e-3")
    assert code == 0, err
    assert "holds the teacher corrected on these inputs" in stdout and "fine-tuning the teacher" not in stdout
    assert f"resuming from {out}.checkpoints/checkpoint-2" in stdout

    shutil.rmtree(out)
    code, _, err = run_cli(capsys, *common, "--correct-teacher-tokens", 96, "--lr", "1e-3")
    line = one_line_error(code, err, "distill")
    assert "belong to another run" in line and "teacher_correction" in line
    code, _, err = run_cli(capsys, *common, "--lr", "1e-3")  # no correction: another run too
    assert "teacher_correction" in one_line_error(code, err, "distill")


def test_bad_correction_flags_are_one_line_errors(workspace, capsys, tmp_path):
    base = ["distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys),
            "--data", workspace / "heldout.txt", "--out", tmp_path / "out"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then the one error line
        run_cli(capsys, *base, "--correct-teacher-tokens", 0)
    assert exit_info.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == (
        "slimlm distill: error: argument --correct-teacher-tokens: expected a positive integer, got '0'")
    code, _, err = run_cli(capsys, *base, "--correct-teacher-lr", "1e-5")
    assert "needs --correct-teacher-tokens" in one_line_error(code, err, "distill")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.teacher-corrected").exists()
