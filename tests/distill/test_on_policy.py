"""On-policy distillation (GKD): the student's continuation replaces the block after its
prompt, only the sampled tokens count, the teacher scores exactly those, and the choice of
on-policy batches is a seeded coin of probability λ."""
import pytest
import torch
import transformers

from slimlm.distill.on_policy import student_continuations, use_student_samples
from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
from slimlm.losses import kl_div_loss
import tiny
from tiny import tiny_model

VOCAB = 96


def models():
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3)
    return tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train(), teacher


def test_continuations_keep_the_prompt_and_mask_it_out():
    student, _ = models()
    ids = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[2, 3:] = 0  # its prompt (5 tokens) holds padding: this row keeps its own text
    torch.manual_seed(0)
    out = student_continuations(student, ids, mask, prompt_fraction=0.5)
    assert student.training  # the mode it was in
    assert torch.equal(out["input_ids"][:, :5], ids[:, :5])
    assert not torch.equal(out["input_ids"][:2, 5:], ids[:2, 5:])
    assert torch.equal(out["labels"][:2, :5], torch.full((2, 5), -100))
    assert torch.equal(out["labels"][:2, 5:], out["input_ids"][:2, 5:]) and out["attention_mask"][:2].all()
    assert torch.equal(out["input_ids"][2], ids[2]) and torch.equal(out["labels"][2], ids[2].masked_fill(mask[2] == 0, -100))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        student_continuations(student, ids[:, :1], None)


def test_the_coin_is_seeded_and_has_probability_lambda():
    draws = [use_student_samples(0.3, 0, step, 0) for step in range(2000)]
    assert draws == [use_student_samples(0.3, 0, step, 0) for step in range(2000)]
    assert 0.26 < sum(draws) / len(draws) < 0.34
    assert use_student_samples(1.0, 0, 5, 1) and not use_student_samples(0.0, 0, 5, 1)


def test_teacher_scores_the_students_samples(tmp_path):
    student, teacher = models()
    data = tiny.token_dataset(VOCAB, 4, 16, seed=12)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], save_strategy="no",
                                          disable_tqdm=True, per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                                          learning_rate=3e-3, seed=0)
    config = DistillationConfig(beta=0.5, on_policy_fraction=1.0, on_policy_prompt_fraction=0.25)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                  distillation_config=config)
    seen = []
    resample = trainer.on_policy.maybe_resample
    trainer.on_policy.maybe_resample = lambda *a: seen.append(resample(*a)) or seen[-1]
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    torch.manual_seed(0)
    loss = trainer.compute_loss(student, batch)
    sampled = seen[-1]
    assert torch.equal(sampled["labels"][:, :4], torch.full((4, 4), -100))
    with torch.no_grad():
        s = student(input_ids=sampled["input_ids"]).logits
        t = teacher(input_ids=sampled["input_ids"]).logits
    expected = kl_div_loss(s[:, :-1], t[:, :-1], labels=sampled["labels"][:, 1:], beta=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(entry["student_sampling_s"] > 0 for entry in logged)


@pytest.mark.parametrize("kwargs,message", [
    (dict(on_policy_fraction=1.5), "on_policy_fraction must be in \\[0, 1\\]"),
    (dict(on_policy_fraction=0.5, on_policy_prompt_fraction=1.0), "on_policy_prompt_fraction must be in \\(0, 1\\)"),
    (dict(on_policy_fraction=0.5, on_policy_temperature=0.0), "on_policy_temperature must be > 0"),
    (dict(on_policy_fraction=0.5, topk="cache/"), "needs a live teacher"),
])
def test_bad_on_policy_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**kwargs).check()
