"""slimlm.distill.training.fit_schedule_callback: the learning-rate schedule fitted to a time
budget, kept across a resume. A fake clock (one "second" per step) makes the plan exact."""
import math

import pytest
import torch
import transformers

from slimlm.distill import training
from slimlm.distill.trainer import DistillationTrainer
from tests import tiny
from tests.tiny import tiny_model

VOCAB = 64


class Clock(transformers.TrainerCallback):
    """Advances the fake clock by ``per_step`` seconds at every step's start."""

    def __init__(self, per_step):
        self.now, self.per_step = 0.0, per_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.now += self.per_step


def run(tmp_path, monkeypatch, *, seconds, per_step=1.0, max_steps=60, resume=None, scheduler="cosine", save_steps=5):
    clock = Clock(per_step)
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock.now)
    torch.manual_seed(0)
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1)
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-3, max_steps=max_steps,
        lr_scheduler_type=scheduler, warmup_steps=0.1, logging_steps=1, report_to=[], save_strategy="steps",
        save_steps=save_steps, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    lines = []
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=tiny.token_dataset(VOCAB, 2 * max_steps, 8, 0),
                                  callbacks=[clock, training.fit_schedule_callback(seconds, log=lines.append)])
    trainer.train(resume_from_checkpoint=resume)
    lrs = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    return trainer, lrs, lines


def test_the_schedule_ends_where_the_time_does(tmp_path, monkeypatch):
    trainer, lrs, lines = run(tmp_path, monkeypatch, seconds=30)
    planned = trainer.state.max_steps
    # 1 s per step: about 0.97 · 30 steps fit, far fewer than max_steps 60.
    assert 26 <= planned <= 30 and trainer.state.global_step == planned
    # warmup (a tenth of the plan) then a cosine decay that ends at the plan, not at step 60
    peak = max(lrs.values())
    assert peak == pytest.approx(1e-3, rel=0.05)
    assert lrs[planned] < 0.02 * peak
    assert any("schedule fitted to 0.5 min" in line for line in lines)


def test_more_time_than_max_steps_keeps_max_steps(tmp_path, monkeypatch):
    trainer, lrs, _ = run(tmp_path, monkeypatch, seconds=1000, max_steps=20)
    assert trainer.state.max_steps == 20 and trainer.state.global_step == 20
    assert lrs[20] < 0.02 * max(lrs.values())


def test_a_resumed_run_keeps_the_plan_and_its_learning_rates(tmp_path, monkeypatch):
    first, lrs, _ = run(tmp_path / "a", monkeypatch, seconds=30)
    planned = first.state.max_steps
    checkpoint = tmp_path / "a" / "checkpoint-15"
    assert checkpoint.is_dir()
    # The resumed run's clock is ten times faster: a fresh plan would be longer; the kept one is not.
    resumed, again, lines = run(tmp_path / "a", monkeypatch, seconds=30, per_step=0.1, resume=str(checkpoint))
    assert resumed.state.max_steps == planned and resumed.state.global_step == planned
    assert any("resuming the schedule fitted" in line for line in lines)
    for step in range(16, planned + 1):
        assert math.isclose(again[step], lrs[step], rel_tol=1e-9, abs_tol=1e-12), step


def test_a_constant_schedule_only_stops_at_the_plan(tmp_path, monkeypatch):
    trainer, lrs, _ = run(tmp_path, monkeypatch, seconds=20, scheduler="constant")
    assert trainer.state.global_step < 60 and set(lrs.values()) == {1e-3}


def test_fit_to_time_needs_a_time_budget():
    import argparse

    from slimlm.distill.options import DistillOptions
    from slimlm.errors import InputError

    with pytest.raises(InputError, match="--fit-to-time fits the schedule to --max-minutes: give --max-minutes too"):
        DistillOptions.from_args(argparse.Namespace(fit_to_time=True))
    with pytest.raises(InputError, match="fit_to_time fits the schedule to max_minutes"):
        DistillOptions(fit_to_time=True)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        training.fit_schedule_callback(0)
