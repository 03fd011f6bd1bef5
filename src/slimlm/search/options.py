"""The architecture search's options, declared once (``slimlm.options``): ``slimlm search``'s
flags, a recipe's ``search:`` section and ``SearchOptions`` in Python."""
from __future__ import annotations

from dataclasses import dataclass

from slimlm.options import OptionError, Options, option
from slimlm.search.candidates import SearchSpace


@dataclass
class SearchOptions(Options):
    """How the search ranks shapes: the ``top_n`` candidates closest to the budget scored
    zero-shot on the ``held_out`` share of ``num_blocks`` calibration blocks of ``seq_len``
    tokens, the best ``top_k`` of them re-ranked by a short distillation of ``rerank_tokens``
    tokens at ``lr``; ``space`` the shapes searched (``SearchSpace``'s fields; ``slimlm search``
    makes it from its space flags)."""

    SECTION = "search"

    top_n: int = option(20, "candidates closest to the budget, scored zero-shot (KD and LM loss)", check="positive")
    top_k: int = option(4, "of those, re-ranked by a short distillation (0: zero-shot only)", check="non_negative")
    num_blocks: int = option(64, "calibration blocks of seq_len tokens drawn from the training data by a seeded "
                                 "order (only those are read)", check="positive")
    seq_len: int = option(256, "tokens per calibration block", check="positive")
    held_out: float = option(0.25, "held-out share of the blocks, scored: a fraction in (0, 1) or a block count",
                             check="positive")
    rerank_tokens: int | None = option(None, "tokens of each short distillation (default: one pass over the "
                                             "training split)", check="positive")
    batch_size: int = option(8, "blocks per batch", check="positive")
    lr: float | None = option(None, "learning rate of the short distillations (a recipe's, default distill.lr; "
                                    "slimlm search takes --learning_rate)", check="positive", cli=False)
    space: dict = option({}, "the shapes searched: SearchSpace's fields (slimlm search: --max-width-prune, "
                             "--max-depth-prune, --multiple-of, --depth-selection)", cli=False, flag="search space")

    def check(self) -> None:
        if self.top_k > self.top_n:
            raise OptionError("top_k", f"{self.top_k} is larger than {{top_n}} {self.top_n}: only the candidates "
                                       "scored zero-shot are re-ranked", mentions=("top_n",))
        if self.held_out >= 1 and not float(self.held_out).is_integer():
            raise OptionError("held_out", f": a fraction in (0, 1) or a whole block count, got {self.held_out}")
        try:
            self.search_space().check()
        except (ValueError, TypeError) as error:
            raise OptionError("space", f": {error}") from None

    def search_space(self) -> SearchSpace:
        """``space`` as a ``SearchSpace``."""
        return SearchSpace.coerce(self.space)
