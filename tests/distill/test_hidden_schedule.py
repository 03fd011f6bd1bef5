"""Minitron's hidden-state loss weighting (``hidden_loss_schedule="minitron"``): the hidden term
is rescaled each step by the detached ratio logit loss / hidden loss, so its value is the logit
term's and its gradient the hidden loss's, scaled by that constant."""
import pytest
import torch
import transformers

from slimlm.distill.trainer import DistillationConfig, DistillationTrainer, hidden_loss_scale
import tiny
from tiny import tiny_model

VOCAB = 96


def trainer_for(tmp_path, **config):
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3)
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                                          save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4)
    data = tiny.token_dataset(VOCAB, 4, 16, seed=11)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                               distillation_config=DistillationConfig(layer_map={1: 2, 2: 3}, **config)), data


def loss_and_grads(trainer, data):
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    trainer.model.zero_grad()
    trainer._metrics = {}
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    params = list(trainer.model.parameters())
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    return loss.detach(), grads, trainer._metrics["kd_loss"], trainer._metrics.get("hidden_loss")


def test_minitron_term_is_kd_over_hidden_times_hidden_with_a_detached_ratio(tmp_path):
    weight = 0.5
    minitron, data = trainer_for(tmp_path, hidden_loss_weight=weight, hidden_loss_schedule="minitron")
    loss, grads, kd, hidden = loss_and_grads(minitron, data)
    assert hidden > 0.01 and kd > 0.01
    # value: kd + weight · (kd / hidden) · hidden = (1 + weight) · kd
    assert loss.item() == pytest.approx(kd + weight * kd / hidden * hidden, rel=1e-5)
    # gradient: that of a fixed weight equal to weight · kd / hidden (the ratio a constant) ...
    fixed, _ = trainer_for(tmp_path, hidden_loss_weight=weight * kd / hidden)
    fixed_loss, fixed_grads, _, _ = loss_and_grads(fixed, data)
    assert fixed_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    for got, want in zip(grads, fixed_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # ... and not that of (1 + weight) · kd, which a ratio with a gradient would give
    logit_only, _ = trainer_for(tmp_path, kd_weight=1.0 + weight)
    _, logit_grads, _, _ = loss_and_grads(logit_only, data)
    differs = [not torch.allclose(got, want, rtol=1e-3, atol=1e-6) for got, want in zip(grads, logit_grads)]
    assert any(differs)


def test_scale_is_detached_and_safe_at_zero():
    kd = torch.tensor(2.0, requires_grad=True)
    hidden = torch.tensor(0.5, requires_grad=True)
    config = DistillationConfig(hidden_loss_weight=1.0, hidden_loss_schedule="minitron")
    scale = hidden_loss_scale(config, kd, hidden)
    assert scale.item() == pytest.approx(4.0) and not scale.requires_grad
    assert hidden_loss_scale(config, kd, torch.tensor(0.0)).item() == 0.0
    assert hidden_loss_scale(DistillationConfig(hidden_loss_weight=1.0), kd, hidden) == 1.0


@pytest.mark.parametrize("kwargs,message", [
    (dict(hidden_loss_weight=1.0, hidden_loss_schedule="auto"), "hidden_loss_schedule must be one of fixed, minitron"),
    (dict(kd_weight=0.0, ce_weight=1.0, hidden_loss_weight=1.0, hidden_loss_schedule="minitron"), "needs kd_weight > 0"),
])
def test_bad_schedule_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**kwargs).check()
