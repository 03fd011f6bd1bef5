"""Shared benchmark plumbing: one long-format CSV row per measurement, and peak memory.

Every benchmark compares providers in the same run and records rows
(op, provider, shape, dtype, metric, value, unit, device, version) to
``$SLIMLM_BENCH_CSV`` (default ``.benchmarks/results.csv``); BENCHMARKS.md's tables
are made from them. ``SLIMLM_BENCH_QUICK=1`` (CI) shrinks shapes and rounds.
"""
from __future__ import annotations

import csv
import gc
import os
import platform
import time

import pytest
import torch

import slimlm

QUICK = os.environ.get("SLIMLM_BENCH_QUICK") == "1"
CSV_PATH = os.environ.get("SLIMLM_BENCH_CSV", os.path.join(".benchmarks", "results.csv"))
FIELDS = ("op", "provider", "shape", "dtype", "metric", "value", "unit", "device", "version")


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def record_row(op, provider, shape, dtype, metric, value, unit, device="cpu") -> None:
    os.makedirs(os.path.dirname(CSV_PATH) or ".", exist_ok=True)
    new = not os.path.exists(CSV_PATH)
    with open(CSV_PATH, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(
            dict(op=op, provider=provider, shape=str(shape), dtype=str(dtype).replace("torch.", ""), metric=metric,
                 value=f"{value:.6g}", unit=unit, device=device_name(device), version=slimlm.__version__)
        )


@pytest.fixture
def record():
    return record_row


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes_above_current(fn) -> int:
    """Peak extra memory while ``fn()`` runs: CUDA allocator peak on GPU, else the
    process's resident-set high-water mark (Linux; reset through /proc/self/clear_refs)."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    base = _proc_status_kib("VmRSS")
    fn()
    return (_proc_status_kib("VmHWM") - base) * 1024


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
