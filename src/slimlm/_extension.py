"""Loads the compiled extension, slimlm._C, without ever breaking ``import slimlm``.

A missing, stale or ABI-incompatible library is reported once with a warning and the
package runs its pure-PyTorch reference instead (``slimlm.backends()`` says what is live).
"""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from slimlm import _C
except Exception as error:  # ImportError, undefined symbols of a stale build, ...
    _C = None
    LOAD_ERROR: Exception | None = error
else:
    LOAD_ERROR = None

_warned = False


def warn_if_missing() -> None:
    """Warn once per process that the compiled kernels are not available."""
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"slimlm: compiled kernels not available ({LOAD_ERROR}); using the pure-PyTorch reference. "
            "Rebuild with `make build` or `pip install -e . --no-build-isolation`.",
            RuntimeWarning,
            stacklevel=3,
        )


# Variants of the hand-vectorised C++ CPU kernels, slowest first (csrc/cpu/isa.h).
CPU_ISAS = ("scalar", "avx2", "avx512")


# What the compiled extension was built with, as it reports it (empty when not loaded), read
# once: the checks below also run while torch.compile traces a loss, and Dynamo cannot call the
# extension's pybind functions.
COMPILED: dict = dict(_C.build_info()) if _C is not None else {}


def cpu_isas() -> tuple[str, ...]:
    """The CPU kernel variants this CPU can run (all up to the best), empty without the extension."""
    best = COMPILED.get("cpu_isa_best")
    return CPU_ISAS[: CPU_ISAS.index(best) + 1] if best in CPU_ISAS else ()


def cpu_isa() -> str | None:
    """The variant the C++ CPU kernels run now: ``SLIMLM_CPU_ISA`` (scalar|avx2|avx512) when set,
    else the best this CPU has; None without the extension.

    Raises ValueError for any other value, or for a variant this CPU cannot run.
    """
    supported = cpu_isas()
    if not supported:
        return None
    forced = os.environ.get("SLIMLM_CPU_ISA", "")
    if not forced:
        return supported[-1]
    if forced not in CPU_ISAS:
        raise ValueError(f"SLIMLM_CPU_ISA must be one of {', '.join(CPU_ISAS)}, got {forced!r}")
    if forced not in supported:
        raise ValueError(
            f"SLIMLM_CPU_ISA={forced}: this CPU runs the {', '.join(supported)} variants only "
            "(unset SLIMLM_CPU_ISA to use the best)"
        )
    return forced


def build_info() -> dict:
    """What the compiled extension contains (empty when it is not loaded), with ``cpu_isa``: the
    CPU kernel variant in use now, and ``cpu_isas``: every variant this CPU can run."""
    info = dict(COMPILED)
    if info:
        info["cpu_isas"] = list(cpu_isas())
        info["cpu_isa"] = cpu_isa()
    return info


def has_op(name: str) -> bool:
    """Whether the extension registered ``torch.ops.slimlm.<name>``."""
    if _C is None:
        return False
    return hasattr(torch.ops.slimlm, name)
