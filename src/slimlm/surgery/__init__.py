"""Model surgery: width and depth pruning of Hugging Face causal LMs into standard checkpoints.

    the_plan = plan(model, {"target_params": 0.5})        # dry run, print(the_plan) for the table
    prune(model, scores, the_plan)                          # in place, one layer at a time
    save_pruned(model, "out/")                              # temp folder + rename; loads with stock transformers

Architectures are described by adapters in ``slimlm.architectures``.
"""
from slimlm.architectures import get_adapter, supported_model_types
from slimlm.surgery.planning import PrunePlan, Target, plan
from slimlm.surgery.apply import prune
from slimlm.surgery.save import save_pruned

__all__ = ["PrunePlan", "Target", "get_adapter", "plan", "prune", "save_pruned", "supported_model_types"]
