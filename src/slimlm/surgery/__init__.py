"""Model surgery: width and depth pruning of Hugging Face causal LMs into standard checkpoints.

    the_plan = plan(model, {"target_params": 0.5})        # dry run, print(the_plan) for the table
    prune(model, scores, the_plan)                          # in place, one layer at a time
    stats = reconstruction_stats(model, blocks)             # or: o_proj/down_proj refitted to what stays
    prune(model, scores, the_plan, reconstruct=stats)
    save_pruned(model, "out/")                              # temp folder + rename; loads with stock transformers

Architectures are described by adapters in ``slimlm.architectures``; the best shape at a budget
is ``slimlm.search``'s to find (it uses this package, never the other way round).
"""
from slimlm.architectures import get_adapter, supported_model_types
from slimlm.surgery.planning import PrunePlan, Target, plan
from slimlm.surgery.apply import prune
from slimlm.surgery.save import save_pruned
from slimlm.surgery.reconstruct import ReconstructionStats, reconstruction_stats
from slimlm.surgery.options import ReconstructOptions

__all__ = ["PrunePlan", "ReconstructOptions", "ReconstructionStats", "Target", "get_adapter", "plan", "prune",
           "reconstruction_stats", "save_pruned", "supported_model_types"]
