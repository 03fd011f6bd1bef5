"""Model surgery: width and depth pruning of Hugging Face causal LMs into standard checkpoints.

    the_plan = plan(model, {"target_params": 0.5})        # dry run, print(the_plan) for the table
    prune(model, scores, the_plan)                          # in place, one layer at a time
    save_pruned(model, "out/")                              # temp folder + rename; loads with stock transformers
    result = search(model, scores, {"target_params": 0.5}, blocks, out="search/")  # the best shape at a budget

Architectures are described by adapters in ``slimlm.architectures``.
"""
from slimlm.architectures import get_adapter, supported_model_types
from slimlm.surgery.planning import PrunePlan, Target, plan
from slimlm.surgery.apply import prune
from slimlm.surgery.save import save_pruned
from slimlm.surgery.budget import Budget
from slimlm.surgery.candidates import Candidate, SearchSpace, enumerate_shapes
from slimlm.surgery.search import SearchResult, search

__all__ = ["Budget", "Candidate", "PrunePlan", "SearchResult", "SearchSpace", "Target", "enumerate_shapes",
           "get_adapter", "plan", "prune", "save_pruned", "search", "supported_model_types"]
