"""The distill stage's DistillOptions beyond the basics (the hidden-state
loss), validated before any work and recorded among the run's inputs."""
import json
import random

import pytest

from slimlm.distill.options import DistillOptions
from tests.tiny import WORDS, tiny_model, word_tokenizer


def texts(seed, count=24):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(8, 16))) + " ." for _ in range(count)]


def test_distill_stage_takes_hidden_loss_options_and_records_them(tmp_path):
    from slimlm.pipeline.distill import distill_stage

    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    student = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, intermediate_size=32)
    options = DistillOptions(seq_len=8, batch_size=2, hidden_loss_weight=1.0, hidden_loss_schedule="minitron")
    flags = ["--use_cpu", "true", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none"]
    _, history = distill_stage(teacher, student, tokenizer, texts(0), str(tmp_path / "out"), options,
                               training_args=flags, layer_map={1: 1, 2: 2}, disable_tqdm=True, log=lambda line: None)
    assert all(entry["hidden_loss"] > 0 for entry in history if "loss" in entry and "hidden_loss" in entry)
    record = json.loads((tmp_path / "out" / "slimlm_distill.json").read_text())
    assert record["inputs"]["distillation_options"]["hidden_loss_schedule"] == "minitron"
    assert record["inputs"]["distillation_options"]["layer_map"] == {"1": 1, "2": 2}
    for bad, message in (({"beta": 1.5}, "beta must be in"), ({"hidden_weight": 1.0}, "unexpected keyword"),
                         ({"hidden_loss_schedule": "dynamic"}, "hidden_loss_schedule: unknown value"),
                         ({"hidden_loss_weight": 1.0, "hidden_loss_schedule": "minitron", "kd_weight": 0.0,
                           "ce_weight": 1.0}, "needs kd_weight > 0")):
        with pytest.raises((ValueError, TypeError), match=message):
            DistillOptions(**bad)


@pytest.mark.parametrize("native", [True, False])
def test_the_run_records_the_precisions_asked_and_what_they_resolved_to(tmp_path, monkeypatch, native):
    """student_precision bfloat16 trains under --bf16 where bfloat16 is native (faked either way),
    else in float32 with a one-line notice; the record keeps the request (an input) and the result,
    both in the dtype table's names."""
    from slimlm.distill import training
    from slimlm.pipeline.distill import distill_stage

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: native)
    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    student = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, intermediate_size=32)
    flags = ["--use_cpu", "true", "--max_steps", "2", "--save_strategy", "no", "--report_to", "none"]
    notices = []
    distill_stage(teacher, student, tokenizer, texts(0), str(tmp_path / "out"),
                  DistillOptions(seq_len=8, batch_size=2, student_precision="bfloat16", teacher_precision="float32"),
                  training_args=flags, disable_tqdm=True, log=notices.append)
    record = json.loads((tmp_path / "out" / "slimlm_distill.json").read_text())
    assert record["inputs"]["student_precision"] == "bfloat16" and record["inputs"]["teacher_precision"] == "float32"
    assert record["precision_used"] == {"teacher": "float32", "student": "bfloat16" if native else "float32"}
    assert sum("student_precision='bfloat16' needs native bfloat16" in line for line in notices) == (not native)
    with pytest.raises(ValueError, match="student_precision: unknown value 'bf16'"):
        DistillOptions(student_precision="bf16")


def test_a_depth_pruned_student_is_compared_with_the_layers_it_was_cut_from(tmp_path):
    """pruned_layer_map reads kept_layers from the student's slimlm_prune.json (student layer i →
    its teacher layer, as hidden_states indices); none for a model pruned twice or of other depths."""
    from slimlm.pipeline.distill import pruned_layer_map

    teacher = tiny_model("llama", "training", num_hidden_layers=4)
    student = tiny_model("llama", "training", num_hidden_layers=3)
    folder = tmp_path / "student"
    folder.mkdir()
    record = folder / "slimlm_prune.json"
    assert pruned_layer_map(str(folder), student, teacher) is None  # no record
    record.write_text(json.dumps({"kept_layers": [0, 2, 3], "previous": None}))
    assert pruned_layer_map(str(folder), student, teacher) == {1: 1, 2: 3, 3: 4}
    record.write_text(json.dumps({"kept_layers": [0, 2, 3], "previous": {"kept_layers": [0, 1, 2, 3, 4]}}))
    assert pruned_layer_map(str(folder), student, teacher) is None
    record.write_text(json.dumps({"kept_layers": [0, 1], "previous": None}))
    assert pruned_layer_map(str(folder), student, teacher) is None


def test_a_narrower_students_folder_holds_the_model_not_the_hidden_projections(tmp_path):
    """The hidden loss learns a projection per layer when the widths differ; the checkpoints keep
    them for a resume, the saved student is a plain HF checkpoint (and its size on disk the model's)."""
    from slimlm.evaluate import disk_bytes
    from slimlm.pipeline.distill import distill_stage

    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    width = teacher.config.hidden_size // 2
    student = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, hidden_size=width,
                         head_dim=teacher.config.head_dim)
    options = DistillOptions(seq_len=8, batch_size=2, hidden_loss_weight=1.0)
    flags = ["--use_cpu", "true", "--max_steps", "2", "--save_steps", "2", "--report_to", "none"]
    out = tmp_path / "out"
    distill_stage(teacher, student, tokenizer, texts(0), str(out), options, training_args=flags,
                  layer_map={1: 1, 2: 2}, disable_tqdm=True, log=lambda line: None)
    assert (tmp_path / "out.checkpoints" / "checkpoint-2" / "hidden_projections.safetensors").is_file()
    assert not (out / "hidden_projections.safetensors").exists()
    assert disk_bytes(out) == (out / "model.safetensors").stat().st_size
