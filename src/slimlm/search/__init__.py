"""Architecture search: the student shape that distills best at a budget (Minitron's).

    result = search(model, scores, {"target_params": 0.5}, blocks, out="search/")  # result.target: prune's Target
    plan = search_candidates(model, Budget(target_params="70M"))                   # what it would score, no work

``candidates``: the search space and every legal shape's exact size; ``budget``: what a shape
must fit in; ``scoring``: zero-shot losses and the short distillation; ``records``: what a
search writes and resumes from; ``run``: the search itself; ``options``: its settings, declared
once for ``slimlm search``, a recipe's ``search:`` section and Python (``SearchOptions``). Uses ``slimlm.surgery`` and
``slimlm.distill``, never the other way round.
"""
from slimlm.search.budget import Budget
from slimlm.search.candidates import Candidate, SearchSpace, enumerate_shapes
from slimlm.search.options import SearchOptions
from slimlm.search.run import CandidatePlan, SearchResult, search, search_candidates

__all__ = ["Budget", "Candidate", "CandidatePlan", "SearchOptions", "SearchResult", "SearchSpace", "enumerate_shapes",
           "search", "search_candidates"]
