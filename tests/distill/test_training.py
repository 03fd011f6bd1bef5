"""slimlm.distill.training: TrainingArguments from flags over slimlm's defaults."""
import pytest


def test_bf16_training_is_refused_only_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    from slimlm.distill import training
    from slimlm.errors import InputError

    flags = ["--use_cpu", "true", "--bf16", "true"]
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    with pytest.raises(InputError, match="no AVX512-BF16 or AMX"):
        training.training_arguments(flags, output_dir=str(tmp_path))
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.training_arguments(flags, output_dir=str(tmp_path)).bf16


@pytest.mark.parametrize("native", [True, False])
def test_student_precision_adds_bf16_only_where_it_is_native(monkeypatch, native):
    """auto: bfloat16 mixed precision where native, silently float32 elsewhere; bfloat16 asked for
    on a CPU without it falls back in one line; float32 and a user's own --bf16/--fp16 add nothing."""
    import torch

    from slimlm.distill import training

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = ["--use_cpu", "true", "--warmup_steps", "0.1"]
    bf16 = base + ["--bf16", "true"]
    assert training.student_precision_flags("auto", base, log=pytest.fail) == (bf16 if native else base)
    notices = []
    assert training.student_precision_flags("bfloat16", base, log=notices.append) == (bf16 if native else base)
    assert len(notices) == (not native) and all("\n" not in n and "native bfloat16" in n for n in notices)
    assert training.student_precision_flags("float32", base, log=pytest.fail) == base
    for own in (["--bf16", "false"], ["--bf16=false"], ["--fp16", "true"], ["--bf16"]):
        assert training.student_precision_flags("auto", base + own, log=pytest.fail) == base + own
    for bad in ("bf16", "fp32", "FP32", None, "int8", "float16"):
        with pytest.raises(ValueError, match=r"^student_precision: unknown value .* \(known: auto, float32, bfloat16"):
            training.student_precision_flags(bad, base)


def test_student_precision_on_cuda_follows_the_device(monkeypatch):
    import torch

    from slimlm.distill import training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        assert training.student_precision_flags("auto", [], log=pytest.fail) == (["--bf16", "true"] if supported else [])
        # --use_cpu true trains on the CPU even where CUDA is there
        assert training.student_precision_flags("auto", ["--use_cpu", "true"], log=pytest.fail) == ["--use_cpu", "true"]



def test_a_forced_cpu_variant_below_avx512_has_no_native_bf16(monkeypatch):
    import torch

    from slimlm.distill import training

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.delenv("SLIMLM_CPU_ISA", raising=False)
    assert training.cpu_has_bf16()
    for isa in ("avx2", "scalar"):
        monkeypatch.setenv("SLIMLM_CPU_ISA", isa)
        assert not training.cpu_has_bf16()
    monkeypatch.setenv("SLIMLM_CPU_ISA", "avx512")
    assert training.cpu_has_bf16()
