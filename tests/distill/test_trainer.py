"""DistillationTrainer on tiny random models: it distills, it is plain fine-tuning when asked,
gradient accumulation does not change the loss, resume is exact, bad input is refused."""
import math

import pytest
import torch
import transformers

from slimlm.distill.trainer import DistillationConfig, DistillationTrainer, check_vocabularies
from slimlm.losses import kl_div_loss
import tiny
from tiny import tiny_model

VOCAB = 96


def token_dataset(num, seq, seed):
    return tiny.token_dataset(VOCAB, num, seq, seed)


def training_args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=8,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="constant", weight_decay=0.0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


def models():
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2)
    return student.train(), teacher


def heldout_kl(student, teacher, data):
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return kl_div_loss(s[:, :-1], t[:, :-1], labels=batch["labels"][:, 1:]).item()


def losses_of(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_distillation_lowers_heldout_kl(tmp_path):
    student, teacher = models()
    train, heldout = token_dataset(64, 24, seed=0), token_dataset(16, 24, seed=1)
    before = heldout_kl(student, teacher, heldout)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=30), train_dataset=train,
        distillation_config=DistillationConfig(temperature=1.0),
    )
    trainer.train()
    after = heldout_kl(student, teacher, heldout)
    assert after < 0.7 * before
    logged = trainer.state.log_history[0]
    for key in ("kd_loss", "tokens_per_s", "teacher_forward_s", "peak_memory_mb"):
        assert key in logged and logged[key] >= 0
    assert 0 < logged["teacher_forward_share"] < 1


def test_ce_only_matches_hf_trainer(tmp_path):
    data = token_dataset(32, 16, seed=3)
    student, teacher = models()
    from slimlm.distill.items import SeededOrder

    class Reference(SeededOrder, transformers.Trainer):  # the HF Trainer, visiting the data in the same order
        pass

    reference = Reference(model=tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train(),
                          args=training_args(tmp_path, max_steps=5), train_dataset=data)
    reference.train()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=5), train_dataset=data,
        distillation_config=DistillationConfig(kd_weight=0.0, ce_weight=1.0),
    )
    trainer.train()
    assert losses_of(trainer) == pytest.approx(losses_of(reference), rel=1e-4, abs=1e-5)


def test_gradient_accumulation_gives_the_one_batch_loss(tmp_path):
    data = token_dataset(32, 16, seed=4)
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        student, teacher = models()
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=data,
            args=training_args(tmp_path, max_steps=4, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=accumulation),
        )
        trainer.train()
        runs.append(losses_of(trainer))
    assert runs[0] == pytest.approx(runs[1], rel=1e-4, abs=1e-5)


class StopAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = True


def test_resume_continues_the_loss_trajectory(tmp_path):
    data = token_dataset(48, 16, seed=5)
    args = dict(max_steps=8, save_strategy="steps", save_steps=4)
    student, teacher = models()
    whole = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                args=training_args(tmp_path / "whole", **args))
    whole.train()

    student, teacher = models()
    first = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                args=training_args(tmp_path / "split", **args), callbacks=[StopAt(4)])
    first.train()  # "killed" after step 4 with its checkpoint written
    student, teacher = models()
    second = DistillationTrainer(model=student, teacher_model=teacher, train_dataset=data,
                                 args=training_args(tmp_path / "split", **args))
    second.train(resume_from_checkpoint=True)
    resumed = losses_of(first)[:4] + [e["loss"] for e in second.state.log_history if "loss" in e and e["step"] > 4]
    assert resumed == pytest.approx(losses_of(whole), rel=1e-4, abs=1e-5)


def test_hidden_state_loss_is_logged_and_finite(tmp_path):
    """The first step logs, before any update, the mean over mapped layers (student s → teacher
    t) of 1 − cos(P_s h_s, h_t) over the batch's real tokens, P_s the projection from the
    student's width (32) to the teacher's (48); here computed in plain torch."""
    student, teacher = models()
    data = token_dataset(8, 16, seed=6)
    layer_map = {1: 2, 2: 3}
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=data,
        args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=len(data)),  # one batch: all of data
        distillation_config=DistillationConfig(hidden_loss_weight=1.0, layer_map=layer_map),
    )
    projections = {layer: trainer.hidden_distiller.projections[str(layer)].weight.detach().clone() for layer in layer_map}
    batch = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        student_states = student(**batch, output_hidden_states=True).hidden_states
        teacher_states = teacher(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    per_layer = [(1 - torch.nn.functional.cosine_similarity(student_states[s] @ projections[s].T, teacher_states[t],
                                                             dim=-1))[real].mean() for s, t in layer_map.items()]
    expected = torch.stack(per_layer).mean().item()
    trainer.train()
    assert all(math.isfinite(e["hidden_loss"]) for e in trainer.state.log_history if "hidden_loss" in e)
    logged = [e["hidden_loss"] for e in trainer.state.log_history if "hidden_loss" in e]
    assert len(logged) == 2 and logged[0] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert logged[1] != logged[0]  # the projections and the student learn


@pytest.mark.parametrize("bf16,gemm_dtype,expected", [
    (False, "auto", None), (True, "auto", torch.bfloat16), (True, "float32", torch.float32),
])
def test_loss_gemms_follow_mixed_precision(tmp_path, monkeypatch, bf16, gemm_dtype, expected):
    """bf16=True runs the model under autocast but compute_loss outside it: the trainer hands the
    loss its GEMM dtype, and bf16 distillation still learns."""
    import slimlm.distill.trainer as trainer_module

    seen = []
    original = trainer_module.fused_linear_kl_div_loss

    def spy(*args, **kwargs):
        seen.append(kwargs["gemm_dtype"])
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "fused_linear_kl_div_loss", spy)
    student, teacher = models()
    train, heldout = token_dataset(64, 24, seed=0), token_dataset(16, 24, seed=1)
    before = heldout_kl(student, teacher, heldout)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=20, bf16=bf16),
        train_dataset=train, distillation_config=DistillationConfig(gemm_dtype=gemm_dtype),
    )
    trainer.train()
    assert seen and set(seen) == {expected}
    assert heldout_kl(student, teacher, heldout) < 0.8 * before


def test_vocabulary_checks():
    student, teacher = tiny_model("llama", "training", vocab_size=96), tiny_model("llama", "training", vocab_size=128)
    assert check_vocabularies(student, teacher) == 96
    with pytest.raises(ValueError, match=r"student vocabulary \(96\) and teacher vocabulary \(2000\)"):
        check_vocabularies(student, tiny_model("llama", "training", vocab_size=2000))


@pytest.mark.parametrize("kwargs,message", [
    (dict(kd_weight=0.0, ce_weight=0.0), "nothing to learn"),
    (dict(temperature=0.0), "temperature"),
    (dict(beta=2.0), "beta"),
    (dict(hidden_loss_kind="l1"), "hidden_loss_kind"),
    (dict(gemm_dtype="int8"), "gemm_dtype must be one of auto, float32, bfloat16, float16"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**kwargs).check()


def launcher_env():
    """A clean environment for worker processes: earlier in-process Trainers leave
    accelerate/torch.distributed variables in os.environ."""
    import os
    import sys

    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_"))
                 and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")}
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def test_two_process_gloo_matches_one_process(tmp_path):
    """Data parallelism (torchrun, 2 CPU processes on gloo) gives the loss curve of one
    process on the same global batch: the loss is normalised by the global token count."""
    import json
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    env = launcher_env()
    one = tmp_path / "one" / "losses.json"
    two = tmp_path / "two" / "losses.json"
    one.parent.mkdir()
    two.parent.mkdir()
    subprocess.run([sys.executable, worker, str(one), "4"], check=True, env=env, timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(two), "2"],
        check=True, env=env, timeout=300,
    )
    single, distributed = json.loads(one.read_text()), json.loads(two.read_text())
    assert distributed["world_size"] == 2 and len(single["losses"]) == 5
    assert distributed["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("version", ["fsdp1", "fsdp2"])
@pytest.mark.parametrize("teacher", ["replicated", "shard-teacher"])
def test_fsdp_sharded_models_match_one_process(tmp_path, version, teacher):
    """FSDP1 and FSDP2 (2 CPU processes, gloo), the student and also the teacher sharded per
    layer and at the root: the student's LM head is read between its forward and backward
    (the root stays gathered), the teacher's comes whole from ``lm_heads.whole_lm_head`` (an FSDP1
    teacher is resharded after a no-grad forward), and the loss and full gradients equal
    one process's on the whole batch."""
    import json
    import os
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, worker, str(one), version, teacher], check=True, env=launcher_env(), timeout=300)
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker, str(two), version,
         teacher],
        check=True, env=launcher_env(), timeout=300,
    )
    single, sharded = json.loads(one.read_text()), json.loads(two.read_text())
    assert sharded["world_size"] == 2
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sharded["grads"].keys() == single["grads"].keys()
    for name, grad in single["grads"].items():
        want, got = torch.tensor(grad), torch.tensor(sharded["grads"][name])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * max(want.abs().max().item(), 1.0))


def test_teacher_correction_fits_the_distillation_data(tmp_path):
    from slimlm.distill.trainer import correct_teacher

    _, teacher = models()
    data = token_dataset(16, 16, seed=7)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        before = teacher(**batch).loss.item()
    corrected = correct_teacher(teacher, data, training_args(tmp_path, max_steps=10, learning_rate=1e-2))
    with torch.no_grad():
        after = corrected(**batch).loss.item()
    assert not corrected.training and after < before - 0.05
    with pytest.raises(ValueError, match="non-empty"):
        correct_teacher(teacher, [], training_args(tmp_path))


def test_empty_dataset_is_refused(tmp_path):
    student, teacher = models()
    with pytest.raises(ValueError, match="empty"):
        DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path), train_dataset=[])


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_embeddings_stay_and_the_rest_trains(tmp_path, tied):
    student, teacher = models()
    if not tied:
        student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2, tie_word_embeddings=False).train()
    assert (student.get_input_embeddings().weight is student.get_output_embeddings().weight) == tied
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    train, heldout = token_dataset(32, 24, seed=0), token_dataset(16, 24, seed=1)
    kl_before = heldout_kl(student, teacher, heldout)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=12),
                                  train_dataset=train, distillation_config=DistillationConfig(freeze_embeddings=True))
    trainer.train()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    for name, parameter in student.named_parameters():
        if name in frozen:
            assert not parameter.requires_grad and torch.equal(parameter, before[name]), name
        else:
            assert parameter.requires_grad and not torch.equal(parameter, before[name]), name
    assert heldout_kl(student, teacher, heldout) < kl_before


def test_freeze_embeddings_must_be_a_bool():
    with pytest.raises(ValueError, match="freeze_embeddings must be True or False"):
        DistillationConfig(freeze_embeddings="yes").check()


def test_a_student_with_nothing_to_train_is_refused(tmp_path):
    student, teacher = models()
    with pytest.raises(ValueError, match="same model object"):
        DistillationTrainer(model=teacher, teacher_model=teacher, args=training_args(tmp_path),
                            train_dataset=token_dataset(4, 16, 0))
    student.requires_grad_(False)  # what a student pruned from a frozen teacher inherits
    with pytest.raises(ValueError, match="no parameter that requires grad"):
        DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path),
                            train_dataset=token_dataset(4, 16, 0))


def test_distills_from_a_cached_topk_teacher_without_a_live_one(tmp_path):
    from slimlm.distill import cache_teacher_topk

    student, teacher = models()
    train = [{k: v for k, v in d.items()} for d in token_dataset(48, 16, seed=8)]
    for item in train:  # the cache holds whole sequences: no padding
        item["attention_mask"] = torch.ones_like(item["input_ids"])
    heldout = token_dataset(16, 16, seed=9)
    cache_teacher_topk(teacher, [d["input_ids"] for d in train], k=16, path=tmp_path / "topk")
    before = heldout_kl(student, teacher, heldout)
    trainer = DistillationTrainer(
        model=student, teacher_model=None, args=training_args(tmp_path, max_steps=30),
        distillation_config=DistillationConfig(topk=str(tmp_path / "topk")),
    )
    assert len(trainer.train_dataset) == 48
    trainer.train()
    assert heldout_kl(student, teacher, heldout) < 0.8 * before
    assert all(math.isfinite(e["topk_loss"]) for e in trainer.state.log_history if "topk_loss" in e)
    with pytest.raises(ValueError, match="cached at temperature 1.0, asked for 2.0"):
        DistillationTrainer(model=student, teacher_model=None, args=training_args(tmp_path),
                            distillation_config=DistillationConfig(topk=str(tmp_path / "topk"), temperature=2.0))


def test_saved_student_loads_in_older_readers_and_casts_to_the_save_dtype(tmp_path):
    """What the distill stage does after training: the Trainer's folder, its tokenizer readable by
    transformers 4.x / llama.cpp's converter, its weights cast to the save dtype."""
    import json

    from slimlm.models import cast_checkpoint
    from tiny import cast_weights, word_tokenizer

    student, teacher = models()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=1),
                                  train_dataset=token_dataset(4, 12, seed=0), processing_class=word_tokenizer())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    config = json.loads((tmp_path / "final" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cast_checkpoint(tmp_path / "final", "bfloat16") == torch.bfloat16
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final", attn_implementation="eager").eval()
    expected = cast_weights(student.eval(), torch.bfloat16)
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=0, atol=0)
    assert json.loads((tmp_path / "final" / "config.json").read_text())["dtype"] == "bfloat16"
