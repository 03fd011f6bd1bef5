"""The teacher-correction stage: it fine-tunes a copy of the teacher on the data, saves it with
its inputs, a rerun of the same inputs loads it instead of training, other inputs are refused
or (with overwrite) redone, and the distill stage records the correction as an input."""
import json
import random

import pytest
import torch

from slimlm.errors import InputError
from slimlm.pipeline.correct import correct_teacher_stage, correction_inputs, corrected_stale_reason
from slimlm.pipeline.distill import distill_inputs
from tests.tiny import WORDS, tiny_model, word_tokenizer


def texts(seed, count=24):
    generator = random.Random(seed)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(8, 16))) + " ." for _ in range(count)]


def lm_loss(model, tokenizer, docs):
    batch = tokenizer(docs, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_correction_trains_saves_and_is_reused(tmp_path):
    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    data, out, lines = texts(0), tmp_path / "corrected", []
    settings = dict(tokens=256, seq_len=16, batch_size=2, learning_rate=3e-3, disable_tqdm=True, log=lines.append)
    corrected = correct_teacher_stage(teacher, tokenizer, data, str(out), **settings)
    assert lm_loss(corrected, tokenizer, data) < lm_loss(teacher, tokenizer, data) - 0.05
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())  # a copy was trained
    inputs = correction_inputs(teacher, data, tokens=256, seq_len=16, batch_size=2, learning_rate=3e-3)
    assert corrected_stale_reason(str(out), inputs) is None and corrected.slimlm_teacher_correction == inputs
    record = json.loads((out / "slimlm_stage.json").read_text())
    assert record["steps"] == 8 and record["tokens_seen"] == 256  # ⌈256 / (2 · 16)⌉
    assert not (out / "trainer").exists()

    lines.clear()
    again = correct_teacher_stage(teacher, tokenizer, data, str(out), **settings)
    assert any("loading it" in line for line in lines) and not any("fine-tuning" in line for line in lines)
    for key, value in corrected.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    assert again.slimlm_teacher_correction == inputs

    # The correction is a distillation input; another budget is another teacher.
    with_correction = distill_inputs(again, teacher, data)
    assert with_correction["teacher_correction"] == inputs
    assert "teacher_correction" not in distill_inputs(teacher, teacher, data)
    with pytest.raises(InputError, match="already exists"):
        correct_teacher_stage(teacher, tokenizer, data, str(out), **{**settings, "tokens": 128})
    redone = correct_teacher_stage(teacher, tokenizer, data, str(out), **{**settings, "tokens": 128}, overwrite=True)
    assert redone.slimlm_teacher_correction["tokens"] == 128
    assert distill_inputs(redone, teacher, data) != with_correction


@pytest.mark.parametrize("change,message", [
    (dict(tokens=0), "--tokens must be a positive integer"),
    (dict(learning_rate=float("nan")), "--lr must be > 0 and finite"),
    (dict(training_args=["--max_steps", "3"]), "--max_steps cannot be passed"),
])
def test_bad_settings_write_nothing(tmp_path, change, message):
    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    settings = {**dict(tokens=64, seq_len=16, batch_size=2, learning_rate=1e-3, log=lambda line: None), **change}
    with pytest.raises(InputError, match=message):
        correct_teacher_stage(teacher, tokenizer, texts(0), str(tmp_path / "out"), **settings)
    assert not (tmp_path / "out").exists()

