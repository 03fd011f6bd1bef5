"""The fused distillation loss, ``slimlm.kl_div_loss``, against plain PyTorch: forward + backward.

Providers, in one run on the same logits (forward KL, τ = 1, mean over rows):
- ``ours``: ``kl_div_loss`` with the default dispatch (the C++ kernel on CPU);
- ``eager``: log-softmax of both sides, ``F.kl_div(log_target=True)``, backward;
- ``compile``: ``torch.compile`` of ``eager``;
- on CUDA also ``triton`` and ``cuda``: ``kl_div_loss`` with SLIMLM_BACKEND forcing that backend.

Shapes: CPU 2048×32768 and 1024×49152 fp32; CUDA 8192×128256 bf16. Per provider: median
time of forward + backward, and peak memory above the inputs; on CPU also the median CPU
time of the process per call (user + system, all threads), which other work on a shared
machine inflates far less than wall time. Targets, checked in the ``ours``
case once its baselines ran: on CPU ≥ 3× faster than eager and ≥ 1.5× faster than compile;
everywhere, peak memory at most one gradient-sized buffer. ``SLIMLM_BENCH_QUICK=1`` (CI):
smaller shapes, fewer rounds, and the time check only fails when ours is slower than eager.
The table of ratios is printed at the end of the run (benchmarks/conftest.py).

    .venv/bin/python -m pytest -q benchmarks/bench_kl_div.py --benchmark-only
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import QUICK, peak_bytes_above_current, record_row, release_freed_memory
from slimlm import kl_div_loss
from slimlm.kernels import dispatch

OP = "kl_div"
PROVIDERS = {"cpu": ("eager", "compile", "ours"), "cuda": ("eager", "compile", "triton", "cuda", "ours")}
ROUNDS = 3 if QUICK else 7


def eager_loss(student, teacher):
    """Forward KL(P‖Q) averaged over rows, as plain PyTorch code writes it."""
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="batchmean",
                    log_target=True)


def ours_loss(student, teacher):
    return kl_div_loss(student, teacher)


compiled_eager_loss = torch.compile(eager_loss)
LOSSES = {"eager": eager_loss, "compile": compiled_eager_loss}


def cases() -> list[tuple]:
    """(device, rows, vocab, dtype) of every measured shape."""
    cpu_shapes = [(256, 32768), (128, 49152)] if QUICK else [(2048, 32768), (1024, 49152)]
    found = [("cpu", rows, vocab, torch.float32) for rows, vocab in cpu_shapes]
    if torch.cuda.is_available():
        rows, vocab = (1024, 32000) if QUICK else (8192, 128256)
        found.append(("cuda", rows, vocab, torch.bfloat16))
    return found


PARAMS = [
    pytest.param(case, provider, id=f"{case[0]}-{case[1]}x{case[2]}-{str(case[3]).replace('torch.', '')}-{provider}")
    for case in cases()
    for provider in PROVIDERS[case[0]]
]

# case -> provider -> {"seconds", "peak", "loss"}, filled as the providers of a case run in order.
RESULTS: dict[tuple, dict[str, dict]] = {}
_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def inputs(case) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits of a case (std 4, like an LM's), one case in memory at a time."""
    if case not in _inputs:
        _inputs.clear()
        release_freed_memory()
        device, rows, vocab, dtype = case
        gen = torch.Generator(device=device).manual_seed(rows * vocab)
        student = (torch.randn(rows, vocab, generator=gen, device=device) * 4).to(dtype)
        teacher = (torch.randn(rows, vocab, generator=gen, device=device) * 4).to(dtype)
        _inputs[case] = (student, teacher)
    return _inputs[case]


def check_targets(case, results) -> None:
    """The ``ours`` targets against whichever baselines of the case ran before it."""
    device, rows, vocab, dtype = case
    ours = results["ours"]
    grad_bytes = rows * vocab * torch.tensor([], dtype=dtype).element_size()
    # One gradient; the slack covers the (N,) loss rows and allocator rounding.
    assert ours["peak"] <= 1.05 * grad_bytes + (8 << 20), f"peak {ours['peak'] / 2**20:.1f} MiB"
    eager, compiled = results.get("eager"), results.get("compile")
    if eager is None:
        return
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(ours["loss"] - eager["loss"]) <= tolerance * max(1.0, abs(eager["loss"]))
    if QUICK or device != "cpu":
        # Shared CI machines move single runs: only a wide-margin regression fails.
        assert ours["seconds"] <= eager["seconds"]
        return
    assert eager["seconds"] / ours["seconds"] >= 3.0
    if compiled is not None:
        assert compiled["seconds"] / ours["seconds"] >= 1.5


@pytest.mark.parametrize("case,provider", PARAMS)
def test_kl_div_forward_backward(benchmark, case, provider, monkeypatch):
    device, rows, vocab, dtype = case
    if provider in ("triton", "cuda"):
        if not dispatch.backends()[provider]:
            pytest.skip(f"the {provider} backend is not available here")
        monkeypatch.setenv("SLIMLM_BACKEND", provider)
    loss_fn = LOSSES.get(provider, ours_loss)
    student, teacher = inputs(case)

    def step():
        leaf = student.detach().requires_grad_()
        loss = loss_fn(leaf, teacher)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    loss_value = step().item()  # also the warm-up: compiles, autotunes, faults pages in
    release_freed_memory()
    peak = peak_bytes_above_current(step)
    cpu_seconds = []

    def timed_step():
        start = time.process_time()
        step()
        cpu_seconds.append(time.process_time() - start)

    benchmark.group = f"{OP} {rows}x{vocab} {dtype} {device}"
    benchmark.pedantic(timed_step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = benchmark.stats.stats.median

    shape = (rows, vocab)
    record_row(OP, provider, shape, dtype, "median_s", seconds, "s", device)
    if device == "cpu":
        record_row(OP, provider, shape, dtype, "median_cpu_s", statistics.median(cpu_seconds[1:]), "s", device)
    record_row(OP, provider, shape, dtype, "peak_mib", peak / 2**20, "MiB", device)
    results = RESULTS.setdefault(case, {})
    results[provider] = {"seconds": seconds, "peak": peak, "loss": loss_value}
    benchmark.extra_info.update(provider=provider, peak_mib=peak / 2**20)
    if provider == "ours":
        check_targets(case, results)
