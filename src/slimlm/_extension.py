"""Loads the compiled extension, slimlm._C, without ever breaking ``import slimlm``.

A missing, stale or ABI-incompatible library is reported once with a warning and the
package runs its pure-PyTorch reference instead (``slimlm.backends()`` says what is live).
"""
from __future__ import annotations

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


def build_info() -> dict:
    """What the compiled extension contains (empty when it is not loaded)."""
    return dict(_C.build_info()) if _C is not None else {}


def has_op(name: str) -> bool:
    """Whether the extension registered ``torch.ops.slimlm.<name>``."""
    if _C is None:
        return False
    return hasattr(torch.ops.slimlm, name)
