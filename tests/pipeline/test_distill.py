"""The distill stage's checkpoints: resumed only by the run they belong to, from the newest
complete one; its output swapped in atomically."""
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

from slimlm.distill.options import DistillOptions
from slimlm.errors import InputError
from slimlm.pipeline import distill as stage
from tests.tiny import WORDS, tiny_model, word_tokenizer


def texts(seed, count=24):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(8, 16))) + " ." for _ in range(count)]


@pytest.fixture(scope="module")
def models():
    tokenizer = word_tokenizer()
    return {"tokenizer": tokenizer, "teacher": tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0),
            "other_teacher": tiny_model("llama", "training", vocab_size=len(tokenizer), seed=1),
            "student": lambda: tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, intermediate_size=32)}


def distill(models, out, *, teacher="teacher", data=0, lr=1e-3, lines=None, steps=4, **kwargs):
    log = lines if lines is not None else []
    return stage.distill_stage(
        models[teacher], models["student"](), models["tokenizer"], texts(data), str(out),
        DistillOptions(seq_len=8, batch_size=2, lr=lr), training_args=["--use_cpu", "true", "--max_steps", str(steps), "--save_steps", "2",
                                         "--save_total_limit", "2", "--report_to", "none"],
        disable_tqdm=True, log=log.append, **kwargs)


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def test_a_checkpoint_of_another_run_is_refused_or_cleared(models, tmp_path):
    out = tmp_path / "distilled"
    distill(models, out)
    first = weights(out)
    assert sorted(os.listdir(f"{out}.checkpoints")) == ["checkpoint-2", "checkpoint-4", "slimlm_run.json"]
    # Another teacher, other data, another lr: never a resume of the old run's checkpoint.
    for change in ({"teacher": "other_teacher"}, {"data": 1}, {"lr": 5e-3}):
        with pytest.raises(InputError, match="checkpoints .* belong to another run .*pass --overwrite"):
            distill(models, out, overwrite=True, **change)
    assert all(torch.equal(first[name], weights(out)[name]) for name in first)
    lines = []
    distill(models, out, teacher="other_teacher", lr=5e-3, overwrite=True, resume=False, lines=lines)
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["steps"] == 4 and record["inputs"]["learning_rate"] == 5e-3
    assert any("deleting the checkpoints" in line for line in lines)
    assert not any("resuming" in line for line in lines)
    assert not all(torch.equal(first[name], weights(out)[name]) for name in first)


def test_a_student_of_another_shape_is_refused_not_crashed(models, tmp_path):
    out = tmp_path / "distilled"
    distill(models, out)
    wider = {**models, "student": lambda: tiny_model("llama", "training", vocab_size=len(models["tokenizer"]), seed=2)}
    with pytest.raises(InputError, match=r"student changed"):
        distill(wider, out, overwrite=True)


def test_a_checkpoint_torn_by_a_kill_is_skipped(models, tmp_path):
    out = tmp_path / "distilled"
    distill(models, out)
    complete = weights(out)
    # A SIGKILL while checkpoint-4 was being written: weights there, trainer state not yet.
    os.remove(f"{out}.checkpoints/checkpoint-4/trainer_state.json")
    lines = []
    distill(models, out, overwrite=True, lines=lines)
    assert any("skipping the incomplete checkpoint-4" in line for line in lines)
    assert any(line.endswith("resuming from " + f"{out}.checkpoints/checkpoint-2") for line in lines)
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["steps"] == 4
    resumed = weights(out)
    assert all(torch.allclose(complete[name], resumed[name], atol=1e-5) for name in complete)


def test_a_failed_swap_keeps_the_finished_output(models, tmp_path, monkeypatch):
    """The new student is renamed in before the old one is deleted: a failure in between loses neither."""
    out = tmp_path / "distilled"
    distill(models, out)
    before = sorted(os.listdir(out)), weights(out)
    monkeypatch.setattr("slimlm.outputs._exchange", lambda first, second: False, raising=False)
    real_replace, real_rename = os.replace, os.rename
    failures = []

    def fail_into_out(rename):
        """The first move of the new student into place fails."""
        def renamed(source, destination):
            if os.fspath(destination) == str(out) and not failures:
                failures.append(source)
                raise OSError("disk full")
            return rename(source, destination)
        return renamed

    monkeypatch.setattr(os, "replace", fail_into_out(real_replace))
    monkeypatch.setattr(os, "rename", fail_into_out(real_rename))
    with pytest.raises(OSError, match="disk full"):
        distill(models, out, overwrite=True, resume=False)
    assert failures and sorted(os.listdir(out)) == before[0]
    assert all(torch.equal(before[1][name], weights(out)[name]) for name in before[1])


def test_the_synthetic_share_is_of_the_items_the_run_reads(models, tmp_path):
    """A run that reads 16 of the corpus's blocks with mix_fraction 0.5 trains on 8 synthetic
    blocks, however large the corpus (the share used to be taken of the whole corpus)."""
    lines = []
    distill(models, tmp_path / "out", steps=8, lines=lines, synthetic_texts=texts(7, count=2), mix_fraction=0.5)
    record = json.loads((tmp_path / "out" / "slimlm_distill.json").read_text())
    assert record["num_train_items"] == 16
    assert record["inputs"]["mix_share"] == "items read"  # checkpoints of a run that mixed by the corpus are not this
    assert any("[distill] the teacher-written text is" in line and "of the run's 16 (at most) is 8" in line
               for line in lines)
