"""slimlm: prune a Hugging Face causal LM, then distill the teacher back into it.

Pipeline: importance → prune → distill → evaluate, with fused C++/CUDA/Triton kernels
for the importance reductions and the distillation losses.
"""
from slimlm import _extension
from slimlm.importance import ImportanceScores, estimate_importance
from slimlm.export import export_gguf
from slimlm.kernels.dispatch import backends
from slimlm.losses import (
    FusedLinearKLDivLoss,
    HiddenStateDistiller,
    HiddenStateProjection,
    LMHead,
    causal_lm_kl_div_loss,
    depth_layer_map,
    fused_linear_kl_div_loss,
    fused_linear_topk_kl_div_loss,
    hidden_state_loss,
    kl_div_loss,
    lm_head_spec,
    topk_kl_div_loss,
)
from slimlm.models import load_model, load_tokenizer, save_dtype, smollm2_gguf_path
from slimlm.shards import TokenShards, write_shards
from slimlm.surgery import PrunePlan, ReconstructionStats, Target, plan, prune, reconstruction_stats, save_pruned

# The name ``slimlm.search`` is the search function, bound here (nothing below may bind it again);
# ``from slimlm.search import Budget`` and ``from slimlm.search.records import ...`` still reach the
# package, as imports look it up in sys.modules.
from slimlm.search import Budget, SearchSpace, search

__version__ = "0.1.0"

build_info = _extension.build_info

__all__ = [
    "Budget",
    "FusedLinearKLDivLoss",
    "HiddenStateDistiller",
    "HiddenStateProjection",
    "ImportanceScores",
    "LMHead",
    "PrunePlan",
    "ReconstructionStats",
    "SearchSpace",
    "Target",
    "TokenShards",
    "__version__",
    "backends",
    "build_info",
    "causal_lm_kl_div_loss",
    "depth_layer_map",
    "estimate_importance",
    "export_gguf",
    "fused_linear_kl_div_loss",
    "hidden_state_loss",
    "kl_div_loss",
    "lm_head_spec",
    "load_model",
    "load_tokenizer",
    "plan",
    "prune",
    "reconstruction_stats",
    "save_dtype",
    "save_pruned",
    "search",
    "smollm2_gguf_path",
    "fused_linear_topk_kl_div_loss",
    "topk_kl_div_loss",
    "write_shards",
]

_extension.warn_if_missing()
