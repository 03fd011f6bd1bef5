"""Test-wide setup: Triton runs interpreted on CPU tensors when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from slimlm import _extension  # noqa: E402
from slimlm.kernels import dispatch  # noqa: E402
from slimlm.kernels.triton import runtime as triton_runtime  # noqa: E402


def native_device(backend: str) -> torch.device:
    """Where a backend's test tensors live: CUDA for ``cuda``, and for ``triton`` when a GPU
    exists (it is interpreted on CPU tensors only without one); CPU for ``torch`` and ``cpu``."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def available_backends(device: str | None = "cpu") -> list:
    """pytest params for every backend that runs tensors on ``device``, skipped (with the reason)
    where it cannot run here. ``device=None``: each backend on its ``native_device``; such
    tests take the ``device`` fixture and put their tensors there.

    The C++ CPU backend comes once per instruction-set variant this CPU can run (``cpu-scalar``,
    ``cpu-avx2``, ``cpu-avx512``; the test runs with SLIMLM_CPU_ISA set to it), so an AVX-512
    machine tests all three paths and an AVX2 machine two."""
    live = dispatch.backends()
    params = []
    for name in dispatch.BACKENDS:
        where = native_device(name) if device is None else torch.device(device)
        if (name, where.type) in (("cuda", "cpu"), ("cpu", "cuda")):
            continue
        reason = None
        if not live[name]:
            reason = {
                "cpu": "slimlm._C not built",
                "cuda": "no CUDA build or device",
                "triton": "triton not installed / no GPU and not interpreted",
            }.get(name, "unavailable")
        elif where.type == "cuda" and not torch.cuda.is_available():
            reason = "no CUDA device"
        elif name == "triton" and where.type == "cpu" and not triton_runtime.interpreted():
            reason = "Triton runs on CUDA tensors here (TRITON_INTERPRET is not set)"
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if name == "cpu" and not reason:
            params += [pytest.param(name, marks=[pytest.mark.cpu_isa(isa)], id=f"cpu-{isa}")
                       for isa in _extension.cpu_isas()]
        else:
            params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(autouse=True)
def _forced_cpu_isa(request, monkeypatch):
    """Runs a test marked ``cpu_isa(name)`` (see available_backends) under SLIMLM_CPU_ISA=name."""
    marker = request.node.get_closest_marker("cpu_isa")
    if marker is not None:
        monkeypatch.setenv("SLIMLM_CPU_ISA", marker.args[0])


@pytest.fixture
def device(request):
    """The test's tensor device: the native device of its ``backend`` parameter if it has one,
    else CUDA when present."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "backend" in callspec.params:
        return native_device(callspec.params["backend"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny models run in a millisecond on one, while with
    two OpenMP threads on a loaded 2-core machine each forward can spin for a second (OpenMP's
    barriers cost more than the matmuls). Modules use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _release_output_locks():
    """A test that checks outputs through the Python API releases their locks when it ends, as
    a command does (the ``slimlm`` command releases its own)."""
    yield
    from slimlm import outputs

    outputs.release_locks()
