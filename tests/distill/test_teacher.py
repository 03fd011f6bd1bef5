"""The teacher precision lever (``slimlm.distill.teacher``): each precision's hidden states stay
close to float32's, the caller's model is never cast, a missing CPU feature falls back with a
notice, bad values are refused, and the option reaches the trainer, the CLI and the run's
fingerprint."""
import argparse

import pytest
import torch
import transformers

from slimlm.distill import teacher as teacher_module
from slimlm.distill.teacher import TEACHER_PRECISIONS, prepare_teacher, resolve_teacher_precision
from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
from slimlm.distill.options import DistillOptions
from slimlm.errors import InputError
from slimlm.pipeline.distill import distill_inputs
import tiny
from tiny import tiny_model

VOCAB = 96
# Relative L2 error of the last hidden states against float32 on the tiny model: bfloat16 rounds
# every weight and activation to 8 mantissa bits (~0.4% each), int8 the weights per channel
# and activations per tensor (measured 0.4% and 1.1%; the bounds leave ~5x room).
TOLERANCE = {"float32": 0.0, "bfloat16": 0.02, "int8": 0.05}


@pytest.fixture
def teacher():
    return tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96,
                      num_hidden_layers=3)


@pytest.fixture
def native(monkeypatch):
    """Pretends the CPU has native bfloat16 and an int8 engine, so each precision runs as asked."""
    monkeypatch.setattr(teacher_module, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(teacher_module, "int8_engine_available", lambda: True)


def last_hidden(model, input_ids):
    """The last hidden states, which every precision returns in float32 (the caller's dtype)."""
    with torch.no_grad():
        states = model(input_ids=input_ids, logits_to_keep=torch.empty(0, dtype=torch.long),
                       output_hidden_states=True, use_cache=False).hidden_states
    assert {state.dtype for state in states} == {torch.float32}
    return states[-1]


def snapshot(model):
    return {name: (p.dtype, p.detach().clone()) for name, p in model.state_dict().items()}


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8"])
def test_each_precision_is_close_to_float32_and_leaves_the_caller_alone(teacher, native, precision):
    input_ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(0))
    reference = last_hidden(teacher, input_ids)
    before = snapshot(teacher)
    prepared = prepare_teacher(teacher, precision, log=pytest.fail)
    hidden = last_hidden(prepared, input_ids)
    error = ((hidden - reference).norm() / reference.norm()).item()
    assert error <= TOLERANCE[precision]
    assert (prepared is teacher) == (precision == "float32")
    after = snapshot(teacher)
    assert after.keys() == before.keys()
    for name, (dtype, value) in before.items():
        assert after[name][0] == dtype and torch.equal(after[name][1], value), name
    if prepared is not teacher:
        assert not any(p.requires_grad for p in prepared.parameters()) and not prepared.training
    blocks = [type(module) for module in prepared.model.layers.modules()]
    if precision == "int8":
        assert torch.ao.nn.quantized.dynamic.Linear in blocks
        # The LM head and the embedding it is tied to are the caller's own tensors.
        assert prepared.get_output_embeddings().weight is teacher.get_output_embeddings().weight
        assert prepared.model.embed_tokens.weight is teacher.model.embed_tokens.weight
    else:
        assert torch.ao.nn.quantized.dynamic.Linear not in blocks
    if precision == "bfloat16":
        assert {p.dtype for p in prepared.parameters()} == {torch.bfloat16}
        assert prepared.lm_head.weight is prepared.model.embed_tokens.weight  # still tied
        assert prepared.model.rotary_emb.inv_freq.dtype == torch.float32
    assert error > 0 or precision == "float32"


def test_float32_upcasts_a_bfloat16_teacher_in_a_copy(teacher):
    low = tiny.cast_weights(teacher, torch.bfloat16)
    prepared = prepare_teacher(low, "float32", log=pytest.fail)
    assert prepared is not low and {p.dtype for p in prepared.parameters()} == {torch.float32}
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("precision", ["bfloat16", "auto"])
def test_without_native_bfloat16_the_teacher_runs_as_given(teacher, monkeypatch, precision):
    monkeypatch.setattr(teacher_module, "cpu_has_bf16", lambda: False)
    notices = []
    assert prepare_teacher(teacher, precision, log=notices.append) is teacher
    # Asking for bfloat16 explicitly is told in one line; "auto" just keeps float32.
    assert len(notices) == (precision == "bfloat16")
    assert all("\n" not in line and "native bfloat16" in line for line in notices)


def test_auto_is_bfloat16_on_a_cpu_with_native_bfloat16_and_keeps_a_reduced_teacher(teacher, native):
    assert resolve_teacher_precision(teacher, "auto", log=pytest.fail) == "bfloat16"
    low = tiny.cast_weights(teacher, torch.float16)
    assert prepare_teacher(low, "auto", log=pytest.fail) is low


def test_int8_without_a_quantized_engine_falls_back_with_a_notice(teacher, monkeypatch):
    monkeypatch.setattr(teacher_module, "int8_engine_available", lambda: False)
    notices = []
    assert prepare_teacher(teacher, "int8", log=notices.append) is teacher
    assert len(notices) == 1 and "int8" in notices[0] and "\n" not in notices[0]


def test_int8_off_the_cpu_falls_back_with_a_notice(teacher, monkeypatch):
    """A CUDA teacher (faked: its device is read as cuda) gets bfloat16, or as given without it."""
    monkeypatch.setattr(teacher_module, "_device", lambda model: torch.device("cuda"))
    for supported, expected in ((True, "bfloat16"), (False, "as-given")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        notices = []
        assert resolve_teacher_precision(teacher, "int8", log=notices.append) == expected
        assert len(notices) == 1 and "needs a CPU" in notices[0]
        assert resolve_teacher_precision(teacher, "auto", log=pytest.fail) == "as-given"


def test_a_device_mapped_teacher_runs_as_given(teacher, native):
    teacher.hf_device_map = {"": "cpu"}
    notices = []
    assert prepare_teacher(teacher, "bfloat16", log=notices.append) is teacher
    assert len(notices) == 1 and "device_map" in notices[0]


@pytest.mark.parametrize("bad", ["int4", "FP32", None, "float16", "fp32", "bf16"])
def test_a_bad_precision_is_a_value_error_naming_the_option(teacher, bad):
    with pytest.raises(ValueError, match=r"teacher_precision: unknown value .* \(known: auto, float32, bfloat16, int8"):
        prepare_teacher(teacher, bad)
    if bad is not None:  # None is the config's default: the teacher as given
        with pytest.raises(ValueError, match="teacher_precision"):
            DistillationConfig(teacher_precision=bad).check()
        with pytest.raises(ValueError, match="teacher_precision"):
            DistillOptions(teacher_precision=bad)


def test_the_trainer_keeps_the_teacher_as_given_by_default(tmp_path):
    """No ``teacher_precision``: a bf16 teacher stays bf16, a float32 one is used itself."""
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    for dtype in (torch.float32, torch.bfloat16):
        teacher = tiny.cast_weights(tiny_model("llama", "training", vocab_size=VOCAB, seed=1), dtype)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=tiny.token_dataset(VOCAB, 4, 8, 0))
        assert trainer.teacher is teacher and {p.dtype for p in trainer.teacher.parameters()} == {dtype}


def test_the_fingerprint_differs_per_precision(teacher):
    prints = [distill_inputs(teacher, teacher, ["a text"], DistillOptions(teacher_precision=p))
              for p in TEACHER_PRECISIONS]
    assert len({repr(sorted(p.items())) for p in prints}) == len(TEACHER_PRECISIONS)
    assert distill_inputs(teacher, teacher, ["a text"])["teacher_precision"] == "auto"


def test_the_cli_flag_is_parsed():
    from slimlm.cli import distill as command

    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    base = ["distill", "--teacher", "t", "--student", "s", "--data", "d", "--out", "o"]
    assert parser.parse_args(base).teacher_precision == "auto"
    assert parser.parse_args(base + ["--teacher-precision", "int8"]).teacher_precision == "int8"
    assert parser.parse_args(base).student_precision == "auto"
    assert parser.parse_args(base + ["--student-precision", "float32"]).student_precision == "float32"
    with pytest.raises(InputError, match=r"^--teacher-precision: unknown value 'int4' \(known: auto, float32, "
                                         r"bfloat16, int8\)$"):
        DistillOptions.from_args(parser.parse_args(base + ["--teacher-precision", "int4"]))


def test_an_old_spelling_is_refused_in_one_line_naming_the_new_one():
    """bf16, fp32 (and fp16, f32, f16) were the precisions' names before the dtype table's."""
    with pytest.raises(ValueError) as refused:
        DistillOptions(teacher_precision="bf16")
    assert str(refused.value) == ("teacher_precision: unknown value 'bf16' (known: auto, float32, bfloat16, int8; "
                                  "bf16 is now bfloat16)")
    with pytest.raises(InputError, match=r"^recipe.yaml: distill.student_precision: unknown value 'fp32' "
                                         r"\(known: auto, float32, bfloat16; fp32 is now float32\)$"):
        DistillOptions.from_section({"student_precision": "fp32"}, "recipe.yaml")
    with pytest.raises(InputError, match=r"^--student-precision: unknown value 'bf16' .*; bf16 is now bfloat16\)$"):
        DistillOptions.from_args(argparse.Namespace(student_precision="bf16"))
    with pytest.raises(ValueError, match=r"^teacher_precision: unknown value 'fp32' .*; fp32 is now float32\)$"):
        DistillationConfig(teacher_precision="fp32").check()
    # float16 is no choice of the student's: no new name to point to.
    with pytest.raises(ValueError, match=r"^student_precision: unknown value 'fp16' "
                                         r"\(known: auto, float32, bfloat16\)$"):
        DistillOptions(student_precision="fp16")


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_the_trainer_distills_from_the_prepared_teacher_with_the_callers_head(tmp_path, native, precision):
    teacher = tiny_model("llama", "training", vocab_size=VOCAB, seed=1, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3)
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, learning_rate=3e-3, max_steps=3, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    config = DistillationConfig(teacher_precision=precision, hidden_loss_weight=0.5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, distillation_config=config,
                                  train_dataset=tiny.token_dataset(VOCAB, 12, 16, 0))
    assert trainer.teacher is not teacher
    head = trainer.teacher_head.weight  # the caller's float32 head (a detached view), not the copy's
    assert head.data_ptr() == teacher.lm_head.weight.data_ptr() and head.dtype == torch.float32
    trainer.train()
    losses = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
