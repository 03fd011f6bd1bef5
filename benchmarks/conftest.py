"""Shared benchmark plumbing: one long-format CSV row per measurement, and peak memory.

Every benchmark compares providers in the same run and records rows
(op, provider, shape, dtype, metric, value, unit, device, cpu_isa, version) to
``$SLIMLM_BENCH_CSV`` (default ``.benchmarks/results.csv``); BENCHMARKS.md's tables
are made from them, and the end of the run prints them as tables with each provider's
speed-up over the eager and compiled baselines. ``SLIMLM_BENCH_QUICK=1`` (CI) shrinks
shapes and rounds.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import os
import platform
import time

import pytest
import torch

import slimlm

QUICK = os.environ.get("SLIMLM_BENCH_QUICK") == "1"
CSV_PATH = os.environ.get("SLIMLM_BENCH_CSV", os.path.join(".benchmarks", "results.csv"))
FIELDS = ("op", "provider", "shape", "dtype", "metric", "value", "unit", "device", "cpu_isa", "version")
# This session's rows, for the table printed at the end of the run (pytest_terminal_summary).
SESSION_ROWS: list[dict] = []
# Providers every time is compared with in that table, when they ran in the same group.
BASELINES = ("eager", "compile")


def device_name(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def cpu_isa_name(device: torch.device | str = "cpu") -> str:
    """The C++ CPU kernels' instruction-set variant in use (SLIMLM_CPU_ISA, else the best), for
    CPU rows; torch's own CPU capability (ATEN_CPU_CAPABILITY) is recorded beside it."""
    if torch.device(device).type != "cpu":
        return ""
    ours = slimlm.build_info().get("cpu_isa") or "none"
    return f"{ours} (torch {torch.backends.cpu.get_cpu_capability().lower()})"


def record_row(op, provider, shape, dtype, metric, value, unit, device="cpu") -> None:
    os.makedirs(os.path.dirname(CSV_PATH) or ".", exist_ok=True)
    if os.path.exists(CSV_PATH):
        with open(CSV_PATH, newline="") as handle:
            if next(csv.reader(handle), None) != list(FIELDS):  # written with other columns: keep it aside
                os.replace(CSV_PATH, CSV_PATH + ".old")
    new = not os.path.exists(CSV_PATH)
    row = dict(op=op, provider=provider, shape=str(shape), dtype=str(dtype).replace("torch.", ""), metric=metric,
               value=f"{value:.6g}", unit=unit, device=device_name(device), cpu_isa=cpu_isa_name(device),
               version=slimlm.__version__)
    with open(CSV_PATH, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    SESSION_ROWS.append({**row, "value": float(value)})


def teacher_and_student(real_target: dict, quick_target: dict | None = None):
    """(teacher, magnitude-pruned student, tokenizer or None): SmolLM2-135M (fp32) pruned to
    ``real_target``, or under QUICK a tiny random Llama pruned to ``quick_target`` (default the same)."""
    from slimlm.importance import estimate_importance
    from slimlm.surgery import prune

    if QUICK:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        teacher = LlamaForCausalLM(LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256,
        )).eval()
        tokenizer, target = None, quick_target or real_target
    else:
        from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path

        teacher = load_model(smollm2_gguf_path(), dtype=torch.float32)
        tokenizer, target = load_tokenizer(smollm2_gguf_path()), real_target
    scores = estimate_importance(teacher, None, metrics=("magnitude",), depth=(), progress=False)
    return teacher, prune(teacher, scores, target, inplace=False), tokenizer


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


def release_freed_memory() -> None:
    """Returns memory that earlier measurements freed to the OS (gc, then glibc's malloc_trim),
    so a resident-set peak counts the next function's own allocations rather than pages malloc kept."""
    gc.collect()
    if platform.system() == "Linux":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _summary_cell(value: float, unit: str) -> tuple[str, str]:
    """(column header unit, text) for one value: seconds are shown in milliseconds."""
    if unit == "s":
        return "ms", f"{value * 1e3:.1f}"
    return unit, f"{value:.4g}"


def pytest_terminal_summary(terminalreporter):
    """One table per (op, shape, dtype, device) measured in this session: every metric of every
    provider and, for times, the speed-up over each baseline provider that ran beside it
    (baseline time / provider time: 2.0x = twice as fast)."""
    if not SESSION_ROWS:
        return
    groups: dict[tuple, dict[str, dict[tuple[str, str], float]]] = {}
    for row in SESSION_ROWS:
        key = (row["op"], row["shape"], row["dtype"], row["device"], row["cpu_isa"])
        groups.setdefault(key, {}).setdefault(row["provider"], {})[(row["metric"], row["unit"])] = row["value"]
    terminalreporter.section("slimlm benchmarks (this run)")
    for (op, shape, dtype, device, cpu_isa), providers in groups.items():
        metrics = list(dict.fromkeys(metric for values in providers.values() for metric in values))
        header = ["provider"]
        for metric, unit in metrics:
            header.append(f"{metric} [{_summary_cell(0.0, unit)[0]}]")
            if unit == "s":
                header += [f"vs {base}" for base in BASELINES if (metric, unit) in providers.get(base, {})]
        lines = [header]
        for provider, values in providers.items():
            line = [provider]
            for metric, unit in metrics:
                value = values.get((metric, unit))
                line.append("-" if value is None else _summary_cell(value, unit)[1])
                if unit == "s":
                    for base in BASELINES:
                        base_value = providers.get(base, {}).get((metric, unit))
                        if base_value is not None:
                            line.append("-" if not value else f"{base_value / value:.2f}x")
            lines.append(line)
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        variant = f"  cpu_isa {cpu_isa}" if cpu_isa else ""
        terminalreporter.write_line(f"{op}  shape {shape}  {dtype}  on {device}{variant}")
        for line in lines:
            terminalreporter.write_line("  " + "  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
