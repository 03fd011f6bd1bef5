"""The importance stage's options, declared once (``slimlm.options``): ``slimlm importance``'s
flags, a recipe's ``importance:`` section and ``ImportanceOptions`` in Python."""
from __future__ import annotations

from dataclasses import dataclass

from slimlm.importance.depth import DEPTH_METRICS
from slimlm.importance.estimate import WIDTH_METRICS
from slimlm.options import OptionError, Options, option


@dataclass
class ImportanceOptions(Options):
    """How importance scores are computed: on ``num_samples`` calibration blocks of ``seq_len``
    tokens (Minitron's calibration size by default), with the width ``metrics`` and ``depth``
    metrics named."""

    SECTION = "importance"

    num_samples: int = option(1024, "calibration blocks drawn from the data", check="positive")
    seq_len: int = option(2048, "tokens per calibration block", check="positive")
    batch_size: int = option(8, "blocks per forward pass", check="positive")
    metrics: list[str] = option(["activation"], "width metrics", choices=WIDTH_METRICS)
    depth: list[str] = option(["block_influence", "loss_drop"], "depth metrics (an empty list: none)",
                              choices=DEPTH_METRICS)
    loss_drop_samples: int | None = option(None, "cap on the blocks loss_drop uses (default: all)", check="positive")

    def check(self) -> None:
        if not self.metrics and not self.depth:
            raise OptionError("metrics", "and {depth} are both empty: nothing to score", mentions=("depth",))
