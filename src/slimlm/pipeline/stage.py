"""The stage protocol of a recipe's run, and the one loop that runs a stage.

A stage (a subclass of ``Stage``, one per module of ``slimlm.pipeline``) says what its output
is, what it is made from (``inputs``: fingerprints, digests, settings) and why an output on disk
is not the one those inputs make (``stale_reason``: None when it is); ``run`` makes it and
``load`` reads it back. ``run_stage`` is the runner's whole part: it skips a stage the recipe
does not ask for, compares the recorded inputs, logs the decision, times the stage and runs or
loads it. A stage writes its output through ``slimlm.outputs`` (a temporary sibling swapped
into place), so an interrupted stage leaves the previous output or none.

Every stage reads the same ``RunContext``: the recipe, the loaded teacher and its tokenizer —
made once by ``Pipeline.setup`` after every input was checked, frozen after. What a stage returns
goes to the later stages in ``done`` (by stage name): the first, ``tokenize``, gives the token
shards of the data that every later stage reads from disk.
"""
from __future__ import annotations

import abc
import dataclasses
import os
import time
import typing


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of one run reads; made by ``Pipeline.setup``, never changed after.
    ``started``: the run's ``time.monotonic()`` at its start."""

    recipe: dict
    out: str
    device: str
    dtype: typing.Any
    teacher: typing.Any
    teacher_fp: str
    tokenizer: typing.Any
    progress: bool
    log: typing.Callable[[str], None]
    command: str
    started: float

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def reconstruction(self, train):
        """The teacher's ``reconstruction_stats`` on the first ``reconstruct.num_samples`` blocks of
        ``importance.seq_len`` tokens of the training shards ``train``, computed on first use (by
        the search or the prune stage) and kept in memory for the run (a few hundred MB); None when
        the recipe has no reconstruct section."""
        section = self.recipe["reconstruct"]
        if section is None:
            return None
        memo = self.__dict__.setdefault("_reconstruction", {})  # (the context's own cache; fields stay frozen)
        if "stats" not in memo:
            from slimlm.surgery.reconstruct import reconstruction_stats

            started = time.perf_counter()
            blocks = train.blocks(self.recipe["importance"]["seq_len"], pad_last=True)
            calibration = blocks.select(range(min(len(blocks), section["num_samples"])))
            stats = reconstruction_stats(self.teacher, calibration, batch_size=self.recipe["importance"]["batch_size"],
                                         num_samples=section["num_samples"], ridge=section["ridge"])
            seconds = time.perf_counter() - started  # counted in the stage that asked (search or prune)
            self.log(f"[reconstruct] o_proj/down_proj input statistics of {stats.tokens:,} tokens in {seconds:.0f} s "
                     f"(ridge {section['ridge']:g})")
            memo["stats"] = stats
        return memo["stats"]

    def training_flags(self) -> list[str]:
        """The distill section's ``training_args`` as command-line flags (``--use_cpu`` on a CPU)."""
        flags = ["--use_cpu", "true"] if self.device == "cpu" else []
        for key, value in self.recipe["distill"]["training_args"].items():
            flags += [f"--{key}", str(value)]
        return flags


class Stage(abc.ABC):
    """One step of a run. ``name``: its log tag and timing key; ``output``: its file or folder in
    the run's folder (what the log names). A subclass defines ``run`` and — unless it is made by
    every run (``every_run``) — ``stale_reason`` (None when the output on disk is the one
    ``inputs`` make, else why not: "missing", …) and — unless its ``run`` resumes itself
    (``resumes_itself``) — ``load`` (the output read back); a class
    without them is refused when it is defined. It overrides ``inputs``, and ``wanted`` and
    ``absent`` when the recipe may leave it out."""

    name: typing.ClassVar[str] = ""
    output: typing.ClassVar[str] = ""
    # A stage every run makes anew from the earlier stages' values (the report): no inputs are
    # compared and no decision is logged.
    every_run: typing.ClassVar[bool] = False
    # A stage whose ``run`` reads back what is already done itself (the search's finished
    # candidates, a corrected teacher of the same inputs): it always runs, so it has no ``load``;
    # its ``stale_reason`` says what the run will do.
    resumes_itself: typing.ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        needed = () if cls.every_run else ("stale_reason",) if cls.resumes_itself else ("stale_reason", "load")
        missing = [name for name in needed if not hasattr(cls, name)]
        if missing:
            raise TypeError(f"stage {cls.__name__} compares and reads back its output, so it defines "
                            f"{' and '.join(missing)} (or sets every_run)")

    def wanted(self, ctx: RunContext) -> bool:
        """Whether the recipe asks for this stage (default: always)."""
        return True

    def absent(self, ctx: RunContext, done: dict):
        """What the later stages get when the stage is not wanted (default None)."""
        return None

    def inputs(self, ctx: RunContext, done: dict) -> dict | None:
        """What the output is made from, as its record stores it."""
        return None

    @abc.abstractmethod
    def run(self, ctx: RunContext, done: dict, inputs: dict | None):
        """Make the output from ``inputs``; its value for the later stages."""


def run_stage(stage: Stage, ctx: RunContext, done: dict, timings: dict[str, float]):
    """Run or load ``stage`` (see the module's docstring); its value, also put in ``done``."""
    if not stage.wanted(ctx):
        value = stage.absent(ctx, done)
    else:
        started = time.perf_counter()
        inputs = stage.inputs(ctx, done)
        reason = None if stage.every_run else stage.stale_reason(ctx, inputs)
        output = ctx.path(stage.output)
        if stage.every_run:
            value = stage.run(ctx, done, inputs)
        elif reason is None:
            ctx.log(f"[{stage.name}] skipped: {output} is already done")
            value = stage.load(ctx, done)
        else:
            ctx.log(f"[{stage.name}] running ({os.path.relpath(output, ctx.out)}: {reason})")
            value = stage.run(ctx, done, inputs)
        timings[stage.name] = time.perf_counter() - started
    done[stage.name] = value
    return value
