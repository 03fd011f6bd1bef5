"""The reconstruction's options, declared once (``slimlm.options``): ``slimlm prune``'s
``--num-samples`` and ``--ridge``, a recipe's ``reconstruct:`` section and ``ReconstructOptions``
in Python."""
from __future__ import annotations

from dataclasses import dataclass

from slimlm.options import Options, option
from slimlm.surgery.reconstruct import DEFAULT_RIDGE


@dataclass
class ReconstructOptions(Options):
    """How the kept ``o_proj``/``down_proj`` are refitted to the heads and neurons that stay
    (``slimlm.surgery.reconstruct``): on ``num_samples`` calibration blocks, pulled towards the
    original weights by ``ridge``."""

    SECTION = "reconstruct"

    num_samples: int = option(32, "calibration blocks", check="positive")
    ridge: float = option(DEFAULT_RIDGE, "pull towards the original weights, relative to the inputs' mean energy "
                                         "(large: plain pruning)", check="positive")
