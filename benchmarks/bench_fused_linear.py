"""Fused linear + KL distillation loss against the unfused computation, forward + backward.

Providers, in one run on the same inputs (student and teacher hidden states and LM heads):
- ``slimlm``: ``fused_linear_kl_div_loss`` (row chunks, fp32 logits, gradient in the forward);
- ``eager``: two matmuls → full logits → log_softmax → KL → backward;
- ``compile``: ``torch.compile`` of ``eager``;
- ``liger``: ``LigerFusedLinearJSD`` at β = 0 (forward KL), when liger-kernel imports (CUDA).

Shapes: CPU N=2048, H=576, V=49152 fp32 (SmolLM2-135M's head); CUDA N=8192, H=4096,
V=128256 bf16. Metrics per provider: median seconds of forward + backward and peak memory
above the inputs. Targets (issue 3): peak ≤ 0.2× eager's; time ≤ 1.0× eager's on CPU
(≥ 1.3× faster on GPU). ``SLIMLM_BENCH_QUICK=1`` (CI) shrinks shapes and rounds and fails
only on wide-margin regressions.

    .venv/bin/python -m pytest -q -s benchmarks/bench_fused_linear.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, median_seconds, peak_bytes_above_current, record_row, release_freed_memory
from slimlm.losses import fused_linear_kl_div_loss

OP = "fused_linear_kl_div"


def eager_loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
    """The unfused forward KL: full logits of both sides, fp32 log-softmax, mean over rows."""
    student_logits = (student_hidden @ student_weight.T).float()
    teacher_logits = (teacher_hidden @ teacher_weight.T).float()
    log_q = F.log_softmax(student_logits, dim=-1)
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def fused_loss(student_hidden, student_weight, teacher_hidden, teacher_weight):
    return fused_linear_kl_div_loss(student_hidden, student_weight, teacher_hidden, teacher_weight)


def liger_provider():
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    except Exception:
        return None
    try:
        module = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    except (AssertionError, ValueError):  # releases that only take 0 < β < 1
        return None
    return lambda sh, sw, th, tw: module(sh, sw, th, tw)


def shapes(device: torch.device):
    if device.type == "cuda":
        return (1024, 512, 32000, torch.bfloat16) if QUICK else (8192, 4096, 128256, torch.bfloat16)
    return (256, 128, 8192, torch.float32) if QUICK else (2048, 576, 49152, torch.float32)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


def test_fused_linear_kl_div(benchmark, device):
    rows, hidden, vocab, dtype = shapes(device)
    rounds = 2 if QUICK else 3
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(dtype).to(device)

    student_hidden = make(rows, hidden).requires_grad_()
    student_weight = make(vocab, hidden, scale=hidden**-0.5 * 4).requires_grad_()
    teacher_hidden = make(rows, hidden)
    teacher_weight = make(vocab, hidden, scale=hidden**-0.5 * 4)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)

    providers = {"slimlm": fused_loss, "eager": eager_loss, "compile": torch.compile(eager_loss)}
    liger = liger_provider() if device.type == "cuda" else None
    if liger is not None:
        providers["liger"] = liger

    def step(loss_fn):
        def run():
            student_hidden.grad = None
            student_weight.grad = None
            loss_fn(*inputs).backward()
        return run

    results = {}
    losses = {}

    def measure():
        runs = {name: step(loss_fn) for name, loss_fn in providers.items()}
        for name, run in runs.items():
            run()  # warm-up: compiles, autotunes, faults pages in
            losses[name] = providers[name](*inputs).item()
            student_hidden.grad = None
            student_weight.grad = None
            release_freed_memory()
            results[name] = [peak_bytes_above_current(run)]
        # Providers take turns in every round, so a change in machine load hits all alike.
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(median_seconds(run, rounds=1, warmup=0))
        for name in runs:
            results[name] = (sorted(times[name])[len(times[name]) // 2], results[name][0])
        return results

    benchmark.pedantic(measure, rounds=1, iterations=1)
    shape = (rows, hidden, vocab)
    eager_s, eager_peak = results["eager"]
    print(f"\n{OP} {shape} {dtype} on {device.type}:")
    for name, (seconds, peak) in results.items():
        record_row(OP, name, shape, dtype, "median_s", seconds, "s", device)
        record_row(OP, name, shape, dtype, "peak_mib", peak / 2**20, "MiB", device)
        print(f"  {name:8s} {seconds * 1e3:9.1f} ms  ({eager_s / seconds:5.2f}x eager)  "
              f"peak {peak / 2**20:9.1f} MiB ({peak / max(eager_peak, 1):5.3f}x eager)  loss {losses[name]:.6f}")
    ours_s, ours_peak = results["slimlm"]
    record_row(OP, "slimlm/eager", shape, dtype, "time_ratio", ours_s / eager_s, "x", device)
    record_row(OP, "slimlm/eager", shape, dtype, "peak_ratio", ours_peak / max(eager_peak, 1), "x", device)
    benchmark.extra_info.update(time_ratio=ours_s / eager_s, peak_ratio=ours_peak / max(eager_peak, 1))

    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(losses["slimlm"] - losses["eager"]) <= tolerance * max(1.0, abs(losses["eager"]))
    if QUICK:
        # Shared CI machines move single runs: guard only against wide-margin regressions.
        assert ours_peak <= 0.6 * eager_peak and ours_s <= 3.0 * eager_s
    else:
        assert ours_peak <= 0.2 * eager_peak
        assert ours_s <= (1.0 if device.type == "cpu" else 1 / 1.3) * eager_s
