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
