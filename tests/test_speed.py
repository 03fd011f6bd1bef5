"""speed_report on tiny models: the figures and ratios it promises are there and consistent
(no timing assertions: these machines are shared)."""
from __future__ import annotations

import pytest

from slimlm.evaluate import format_table
from slimlm.speed import TIMED_FIELDS, speed_report, speed_rows
from slimlm.surgery import plan, prune, save_pruned
from tiny import bpe_tokenizer, random_scores, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed")
    teacher = tiny_model("llama", vocab_size=320)
    student = prune(teacher, random_scores(teacher), plan(teacher, {"target_params": 0.5}), inplace=False)
    save_pruned(teacher, folder / "teacher")
    save_pruned(student, folder / "student")
    return teacher, student, folder


def test_every_figure_for_both_models_and_their_ratios(pair):
    teacher, student, folder = pair
    report = speed_report({"teacher": teacher, "student": student}, tokenizer=bpe_tokenizer(),
                          specs={"teacher": folder / "teacher", "student": folder / "student"},
                          prompt_tokens=12, new_tokens=4, batch_sizes=(1, 8), rounds=2, warmup=0)
    setup = report["setup"]
    assert setup["device"] == "cpu" and setup["seq_len"] == 15 and "tensor accounting" in setup["memory"]
    for name, model in (("teacher", teacher), ("student", student)):
        entry = report["models"][name]
        assert entry["params"] == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        assert entry["disk_bytes"] > 0 and entry["dtype"] == "float32"
        assert set(entry["batch"]) == {1, 8}
        for batch, figures in entry["batch"].items():
            for field in TIMED_FIELDS:
                assert figures[field] > 0, (name, batch, field)
            assert figures["prefill_tokens_per_s"] == pytest.approx(batch * 12 / figures["ttft_s"])
            assert figures["decode_tokens_per_s"] == pytest.approx(batch / figures["tpot_s"])
            # full attention: keys and values of every layer at seq_len tokens, float32
            kv = model.config.num_key_value_heads * model.config.head_dim
            assert figures["kv_cache_bytes"] == 2 * model.config.num_hidden_layers * batch * 15 * kv * 4
            assert figures["memory_bytes"] == entry["weights_bytes"] + figures["kv_cache_bytes"]
    ratios = report["ratios"]
    assert ratios["teacher"]["params"] == 1.0 and ratios["teacher"]["batch"][8]["ttft_s"] == 1.0
    student_ratio = ratios["student"]
    assert student_ratio["params"] == pytest.approx(report["models"]["student"]["params"] / report["models"]["teacher"]["params"])
    assert 0.3 < student_ratio["params"] < 0.7 and student_ratio["disk_bytes"] < 0.8
    assert student_ratio["batch"][1]["kv_cache_bytes"] <= 1.0
    table = format_table(speed_rows(report))
    assert len(table.splitlines()) == 2 + 4 and "memory @15" in table  # header, rule, 2 models × 2 batch sizes


def test_bad_settings_are_refused(pair):
    teacher, student, _ = pair
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        speed_report({"teacher": teacher}, new_tokens=1)
    with pytest.raises(ValueError, match="exceeds the context of teacher, student"):
        speed_report({"teacher": teacher, "student": student}, prompt_tokens=60, new_tokens=8)
