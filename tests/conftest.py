"""Test-wide setup: Triton runs interpreted on CPU tensors when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from slimlm.kernels import dispatch  # noqa: E402


def available_backends(device: str = "cpu") -> list:
    """pytest params for every backend, skipped (with the reason) where it cannot run."""
    live = dispatch.backends()
    params = []
    for name in dispatch.BACKENDS:
        if name == "cuda" and device == "cpu":
            continue
        reason = None
        if not live[name]:
            reason = {
                "cpu": "slimlm._C not built",
                "cuda": "no CUDA build or device",
                "triton": "triton not installed / no GPU and not interpreted",
            }.get(name, "unavailable")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
