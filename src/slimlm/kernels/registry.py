"""The one op wrapper: every slimlm op declares itself here once, with its reference, fake
(meta) implementation and Triton launcher; the compiled, Triton and reference backends then
share one name, one fake and one dtype rule.

An op ``name`` is, on every backend:
- ``torch``: ``reference`` (pure PyTorch, the definition of correct; ``reference.py``);
- ``cpu`` / ``cuda``: ``torch.ops.slimlm.<name>``, the schema of ``csrc/ops.cpp`` with its
  C++ and CUDA implementations (when the extension is built and registered it);
- ``triton``: ``torch.ops.slimlm.<name>_triton``, a custom op made by ``triton_op`` in
  ``slimlm/kernels/triton/<file>.py`` (imported on first use; Triton is optional).
Both custom ops get the declared ``fake``, so every backend composes with
``torch.compile(fullgraph=True)``. fp64 input always runs the reference (no kernel has an
fp64 path), as does any call the op's ``reference_only`` rule picks.
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from slimlm import _extension
from slimlm.kernels import dispatch


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable
    fake: Callable
    triton_module: str
    reference_only: Callable[..., bool] | None = None

    def impls(self) -> dict[str, Callable]:
        impls = {"torch": self.reference, "triton": self._triton}
        if _extension.has_op(self.name):
            compiled = getattr(torch.ops.slimlm, self.name)
            impls["cpu"] = compiled
            impls["cuda"] = compiled
        return impls

    def _triton(self, *args):
        if self.triton_module not in sys.modules:  # (a lookup torch.compile can trace; an import it cannot)
            importlib.import_module(self.triton_module)  # registers slimlm::<name>_triton
        return getattr(torch.ops.slimlm, f"{self.name}_triton")(*args)

    def __call__(self, *args, backend: str | None = None):
        """Runs the op on the backend the dispatcher picks for the first argument's device
        (``backend`` or SLIMLM_BACKEND override it; see ``slimlm.kernels.dispatch``)."""
        first = args[0]
        if first.dtype == torch.float64 or (self.reference_only is not None and self.reference_only(*args)):
            backend = "torch"
        return dispatch.run(self.name, self.impls(), first.device, *args, backend=backend)


OPS: dict[str, Op] = {}


def declare(name: str, *, reference: Callable, fake: Callable, triton_module: str,
            reference_only: Callable[..., bool] | None = None) -> Op:
    """Declares op ``name`` (once per process) and registers ``fake`` for its compiled form."""
    if name in OPS:
        raise RuntimeError(f"slimlm op {name!r} is declared twice")
    op = Op(name, reference, fake, triton_module, reference_only)
    OPS[name] = op
    if _extension.has_op(name):
        torch.library.register_fake(f"slimlm::{name}")(fake)
    return op


def triton_op(name: str):
    """Makes ``launch`` (type-annotated, the op's arguments) the custom op ``slimlm::<name>_triton``
    with the declared op's fake, launching on the tensors' CUDA device (Triton launches on the
    current one) or, interpreted, on CPU tensors."""

    def wrap(launch: Callable) -> Callable:
        @functools.wraps(launch)  # the custom op's schema comes from launch's annotations
        def on_device(*args):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            if device.type == "cuda":
                with torch.cuda.device(device):
                    return launch(*args)
            return launch(*args)

        if name not in OPS:
            raise RuntimeError(f"slimlm op {name!r} has a Triton form but no declaration (registry.declare)")
        op = torch.library.custom_op(f"slimlm::{name}_triton", on_device, mutates_args=())
        op.register_fake(OPS[name].fake)
        return op

    return wrap
