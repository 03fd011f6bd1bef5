"""slimlm: prune a Hugging Face causal LM, then distill the teacher back into it.

Pipeline: importance → prune → distill → evaluate, with fused C++/CUDA/Triton kernels
for the importance reductions and the distillation losses.
"""
from slimlm import _extension
from slimlm.kernels.dispatch import backends
from slimlm.losses import kl_div_loss

__version__ = "0.1.0"

__all__ = ["__version__", "backends", "build_info", "kl_div_loss"]

build_info = _extension.build_info

_extension.warn_if_missing()
