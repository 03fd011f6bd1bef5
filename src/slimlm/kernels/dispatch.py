"""Picks which backend runs an op for a given tensor.

Backends: ``torch`` (the reference in ``reference.py``), ``cpu`` (C++ in slimlm._C),
``cuda`` (CUDA in slimlm._C) and ``triton``. By default CPU tensors run the C++
kernel and CUDA tensors the CUDA kernel, then Triton, then the reference, as far as each
is built (BENCHMARKS.md has the measurements behind that order). ``SLIMLM_BACKEND=torch|cpu|cuda|triton``
forces one; a forced backend that cannot run the tensor is an error, not a silent fallback.
The C++ CPU kernels run the instruction-set variant ``SLIMLM_CPU_ISA=scalar|avx2|avx512``
names (default: the best this CPU has; one it lacks is a ValueError).
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from slimlm import _extension
from slimlm.kernels.triton import runtime as triton_runtime

BACKENDS = ("torch", "cpu", "cuda", "triton")


def backends() -> dict[str, bool]:
    """Which backends can run in this process."""
    info = _extension.COMPILED
    return {
        "torch": True,
        "cpu": bool(info.get("cpu")),
        "cuda": bool(info.get("cuda")) and torch.cuda.is_available(),
        "triton": triton_runtime.usable(),
    }


def forced_backend() -> str | None:
    name = os.environ.get("SLIMLM_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"SLIMLM_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def _runnable(backend: str, device: torch.device, impls: Mapping[str, Callable]) -> bool:
    if backend not in impls:
        return False
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and backends()["cpu"]
    if backend == "cuda":
        return device.type == "cuda" and backends()["cuda"]
    if backend == "triton":
        return triton_runtime.usable() and (device.type == "cuda" or triton_runtime.interpreted())
    return False


def choose(op: str, device: torch.device, impls: Mapping[str, Callable], backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``: ``backend`` or SLIMLM_BACKEND if given, else the default."""
    wanted = backend or forced_backend()
    if wanted is not None:
        if wanted not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {wanted!r}")
        if not _runnable(wanted, device, impls):
            raise RuntimeError(
                f"slimlm: backend {wanted!r} cannot run {op} on a {device.type} tensor here "
                f"(available: {', '.join(b for b, ok in backends().items() if ok)}; "
                "Triton on CPU tensors needs TRITON_INTERPRET=1)"
            )
        if wanted == "cpu":
            _extension.cpu_isa()  # a bad SLIMLM_CPU_ISA is a ValueError here, before any kernel
        return wanted
    if device.type == "cuda":
        order = ("cuda", "triton", "torch")
    elif device.type == "cpu":
        order = ("cpu", "torch")
    else:
        order = ("torch",)
    for name in order:
        if _runnable(name, device, impls):
            if name == "torch" and device.type in ("cpu", "cuda"):
                _extension.warn_if_missing()
            if name == "cpu":
                _extension.cpu_isa()
            return name
    return "torch"


def run(op: str, impls: Mapping[str, Callable], device: torch.device, *args, backend: str | None = None, **kwargs):
    """Call ``impls[choose(...)]`` with the given arguments."""
    return impls[choose(op, device, impls, backend)](*args, **kwargs)
