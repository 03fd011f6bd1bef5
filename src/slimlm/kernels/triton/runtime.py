"""The one place that imports Triton and knows whether it runs on a GPU or interpreted.

Triton's interpreter (``TRITON_INTERPRET=1``) runs kernels on CPU tensors; tests use it
on machines without a GPU. It must be set before Triton is first imported.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or a broken install
    triton = None
    tl = None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable() -> bool:
    """Triton is importable and has somewhere to run (a CUDA device, or the interpreter)."""
    return triton is not None and (interpreted() or torch.cuda.is_available())
