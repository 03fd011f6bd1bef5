"""``@triton.jit`` helpers shared by the Triton op files (imported only where Triton is)."""
from __future__ import annotations

from slimlm.kernels.triton.runtime import tl, triton

if triton is None:
    raise ImportError("slimlm.kernels.triton.jit_helpers needs Triton (not importable here)")


@triton.jit
def poisons_softmax(x):
    """1 where x is NaN or +inf (either makes its row's softmax undefined: the row is NaN), else 0."""
    return ((x != x) | (x == float("inf"))).to(tl.int32)
