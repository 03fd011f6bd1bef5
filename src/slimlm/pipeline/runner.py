"""``Pipeline``: claims a validated recipe's output folder, sets up the run (``RunContext``)
and runs its stages in order through ``slimlm.pipeline.stage.run_stage``, which skips the
stages whose outputs are already there and made from the same inputs. A stage is one module of
``slimlm.pipeline``; adding one is adding it to ``Pipeline.stages``."""
from __future__ import annotations

import os
import time

import torch

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.models import default_device, resolve_dtype
from slimlm.pipeline import synthetic
from slimlm.pipeline.correct import CorrectTeacherStage
from slimlm.pipeline.distill import DistillStage
from slimlm.pipeline.evaluate import EvalStage
from slimlm.pipeline.gradual import GradualStage, check_schedule_settings
from slimlm.pipeline.importance import ImportanceStage
from slimlm.pipeline.prune import PruneStage
from slimlm.pipeline.recipe import general_sets
from slimlm.pipeline.report import ReportStage
from slimlm.pipeline.search import SearchStage
from slimlm.pipeline.speed import SpeedStage
from slimlm.pipeline.stage import RunContext, Stage, run_stage
from slimlm.pipeline.synthetic import SyntheticStage
from slimlm.pipeline.teacher_cache import TeacherCacheStage
from slimlm.pipeline.tokenize import TokenizeStage

RECIPE_COPY = "recipe.yaml"


class Pipeline:
    """A validated recipe's run in its ``out`` folder: ``run`` sets it up (``setup``: every input
    checked, the teacher and data loaded, the folder claimed) and runs ``stages`` in order
    (tokenize, importance, search, prune, correct_teacher, synthetic, teacher_cache, distill, eval,
    speed, report); each
    logs whether its output is already there and made from the same inputs, and skips or runs."""

    def __init__(self, recipe: dict, *, overwrite: bool = False, progress: bool = True, log=print,
                 command: str = "slimlm run", recipe_path: str | None = None, trust_remote_code: bool = False):
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.trust_remote_code = trust_remote_code
        self.out = recipe["out"]
        self.overwrite = overwrite
        self.progress = progress
        self.log = log
        self.command = command
        self.device = recipe["device"] or default_device()
        self.dtype = resolve_dtype(recipe["dtype"], self.device)
        self.timings: dict[str, float] = {}
        self.started = time.monotonic()  # this invocation's clock (distill.finish_by_minutes)

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # ---------------------------------------------------------------- setup
    def _check_output(self) -> bool:
        """Refuse an output folder that is, holds or sits inside an input, one of another
        recipe (unless ``overwrite``) and one slimlm did not make (always); nothing is written,
        except that a finished run of this very recipe that an interrupted ``--overwrite`` left
        set aside is put back (``_restore_previous``). Returns whether the folder must be
        cleared (another recipe's run, ``overwrite``)."""
        data = self.recipe["data"]
        inputs = {"teacher": self.recipe["teacher"], "training data": data["train"],
                  "held-out data": data["heldout"], "recipe": self.recipe_path,
                  **{f"general held-out data {name}": paths for name, paths in general_sets(self.recipe).items()}}
        self.out = outputs.check_output(self.out, True, inputs, what="output folder")
        self._restore_previous(only_if_recipe=self.recipe)
        if not (os.path.isdir(self.out) and os.listdir(self.out)):
            return False
        previous = self._recorded_recipe(self.out)
        if previous is None:
            raise InputError(f"output folder {self.out} holds files that are not a slimlm run; choose another out")
        if previous == self.recipe:
            return False
        if not self.overwrite:
            raise InputError(f"output folder {self.out} already holds a run of another recipe; pass --overwrite "
                             "to replace it")
        return True

    @staticmethod
    def _recorded_recipe(folder: str) -> dict | None:
        from slimlm.pipeline.recipe import read_yaml

        path = os.path.join(folder, RECIPE_COPY)
        try:
            with open(path, encoding="utf-8") as handle:
                return read_yaml(handle, path)
        except (OSError, InputError):
            return None

    def _restore_previous(self, only_if_recipe: dict | None = None) -> None:
        """Put back the finished run an ``--overwrite`` set aside (``.<out>.slimlm-old``) in
        place of the unfinished run that was to replace it: after a failure of that run, or
        when the recipe run now is the earlier one's (``only_if_recipe``)."""
        previous = outputs.aside_path(self.out)
        if not os.path.isdir(previous):
            return
        if only_if_recipe is not None and self._recorded_recipe(previous) != only_if_recipe:
            return
        self.log(f"[setup] putting back the finished run set aside in {previous} (the unfinished run that was "
                 f"replacing it in {self.out} is deleted)")
        outputs.remove(self.out)
        os.rename(previous, self.out)

    def _claim_output(self, clear: bool) -> None:
        """Called once every input has been checked: set another recipe's run aside
        (``overwrite``), claim the folder (slimlm's marker) and record this recipe, so that a
        rerun of it resumes. The run set aside is deleted only when this one completes; a failed
        or interrupted replacement puts it back (``run``, ``_restore_previous``)."""
        from slimlm.pipeline.recipe import dump_yaml

        if clear:
            previous = outputs.aside_path(self.out)
            if os.path.lexists(previous):
                self.log(f"[setup] --overwrite: deleting the unfinished run in {self.out} (the finished run it "
                         f"was replacing stays in {previous} until this one completes)")
                outputs.remove(self.out)
            else:
                self.log(f"[setup] --overwrite: the run of another recipe in {self.out} moves to {previous}, "
                         "deleted once this run completes")
                os.rename(self.out, previous)
        outputs.claim(self.out)
        outputs.write_text(self.path(RECIPE_COPY), dump_yaml(self.recipe))

    def setup(self) -> RunContext:
        """Check every input (the data's paths exist: the tokenize stage reads them) and load the
        teacher and its tokenizer before anything is written (even recipe.yaml), so a failed run
        leaves no claim on its output folder; returns the run's context, which the stages only read."""
        from slimlm.data import source_paths
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model, load_tokenizer
        from slimlm.search import search_candidates
        from slimlm.surgery import plan

        recipe = self.recipe
        clear = self._check_output()
        torch.manual_seed(recipe["seed"])
        started = time.perf_counter()
        self.log(f"[setup] loading teacher {recipe['teacher']}")
        try:
            teacher = load_model(recipe["teacher"], dtype=self.dtype, device=self.device,
                                 trust_remote_code=self.trust_remote_code)
            tokenizer = load_tokenizer(recipe["teacher"], trust_remote_code=self.trust_remote_code)
        except FileNotFoundError as error:
            raise InputError(f"teacher: {error}") from None
        # A target the model cannot meet fails now, not after the importance pass.
        try:
            if recipe["search"] is None:
                plan(teacher, recipe["target"])
            else:
                section = recipe["search"]
                search_candidates(teacher, recipe["target"], space=section["space"], top_n=section["top_n"],
                                  top_k=section["top_k"])
        except (ValueError, TypeError, OverflowError) as error:
            raise InputError(f"{'search' if recipe['search'] else 'target'}: {error}") from None
        data_sets = {"train": recipe["data"]["train"], "heldout": recipe["data"]["heldout"],
                     **{f"general.{name}": paths for name, paths in general_sets(recipe).items()}}
        for name, paths in data_sets.items():  # every data path exists (read by the tokenize stage)
            if paths is not None and not any(str(spec).startswith(("hub:", "hf://")) for spec in _listed(paths)):
                try:
                    source_paths(paths)
                except InputError as error:
                    raise InputError(f"data.{name}: {error}") from None
        context = RunContext(recipe=recipe, out=self.out, device=self.device, dtype=self.dtype, teacher=teacher,
                             teacher_fp=model_fingerprint(teacher), tokenizer=tokenizer, progress=self.progress,
                             log=self.log, command=self.command, started=self.started)
        self._check_stage_settings(context)
        self._claim_output(clear)
        self.timings["setup"] = time.perf_counter() - started
        return context

    @staticmethod
    def _check_stage_settings(ctx: RunContext) -> None:
        """The checks the later stages make on their settings, made now, before the output
        folder is claimed or another run set aside (InputError naming the recipe field)."""
        from slimlm.distill.training import training_arguments
        from slimlm.pipeline.correct import check_correction_settings

        recipe = ctx.recipe
        if recipe["synthetic"] is not None:  # the settings now; the prompts cut from the data, in the stage
            # engine vllm reads the writing teacher's folder: the recipe's teacher, now; the
            # corrected teacher's, once its stage has written it
            settings, corrected = synthetic.synthetic_settings(ctx), synthetic.SyntheticStage.corrected_writer(ctx)
            if corrected and settings["writing"].get("server"):
                raise InputError("synthetic.server serves the teacher it was started with, and the corrected "
                                 "teacher is made during the run: set synthetic.writer: original, or sample in "
                                 "process (no synthetic.server)")
            synthetic.check_synthetic(ctx.teacher, ctx.tokenizer, ["A prompt."], model_path=ctx.recipe["teacher"],
                                      **({**settings, "writing": None} if corrected else settings))
        section = recipe["distill"]  # its own values were checked with the recipe (DistillOptions)
        try:
            training_arguments(ctx.training_flags(), output_dir=ctx.path("distilled.checkpoints"),
                               batch_size=section["batch_size"], learning_rate=section["lr"], seed=recipe["seed"])
        except InputError as error:
            raise InputError(f"distill.training_args: {error}") from None
        search = recipe["search"]
        if search is not None and search["rerank_tokens"] and search["top_k"]:
            # (without rerank_tokens the re-ranking is one pass over the search's blocks: the stage checks)
            from slimlm.pipeline.search import check_token_budget, rerank_tokens

            check_token_budget(section["max_tokens"], rerank_tokens(search, train_blocks=0))
        if section["corpus_weights"]:  # named after data.train's files, which the recipe's check did not read
            from slimlm.distill.options import corpus_weights_of
            from slimlm.shards.identity import source_names

            corpus_weights_of(section["corpus_weights"], source_names(recipe["data"]["train"], "data.train"),
                              "distill.corpus_weights")
        if recipe["teacher_cache"] is not None:
            from slimlm.distill.options import TeacherCacheOptions

            TeacherCacheOptions(**recipe["teacher_cache"]).check_distillation(section, recipe["synthetic"])
        correction = recipe["correct_teacher"]
        if correction is not None:
            check_correction_settings(tokens=correction["tokens"], learning_rate=correction["lr"] or section["lr"] / 10,
                                      seq_len=correction["seq_len"] or section["seq_len"],
                                      batch_size=correction["batch_size"] or section["batch_size"])
        check_schedule_settings(ctx)


    # ------------------------------------------------------------------ run
    def stages(self) -> tuple[Stage, ...]:
        """The stages in the order they run (``slimlm.pipeline.stage``); with a schedule, the
        gradual stage in place of the search, prune and distill stages."""
        if self.recipe.get("schedule") is not None:
            return (TokenizeStage(), ImportanceStage(), CorrectTeacherStage(), SyntheticStage(), TeacherCacheStage(),
                    GradualStage(), EvalStage(), SpeedStage(), ReportStage(self.timings))
        return (TokenizeStage(), ImportanceStage(), SearchStage(), PruneStage(), CorrectTeacherStage(),
                SyntheticStage(), TeacherCacheStage(), DistillStage(), EvalStage(), SpeedStage(),
                ReportStage(self.timings))

    def run(self, until: str | None = None) -> dict:
        """``setup``, then every stage in order (up to the stage named ``until``, whose value and
        the earlier ones' it returns by name); a whole run returns {"results", "report",
        "table", "out", "timings"}. When a stage fails (or is interrupted) in a run that was
        replacing another recipe's finished run, that run is put back: the output folder holds a
        finished run or a run of this recipe resuming, never a half-finished replacement in place
        of a finished run. Once the report is written, the run this one replaced is deleted."""
        context = self.setup()
        done: dict = {}
        try:
            for stage in self.stages():
                run_stage(stage, context, done, self.timings)
                if stage.name == until:
                    return done
        except BaseException:
            self._restore_previous()
            raise
        previous = outputs.aside_path(self.out)
        if os.path.lexists(previous):
            self.log(f"[report] this run is complete: deleting the run it replaced ({previous})")
            outputs.remove(previous)
        return {**done["report"], "out": self.out, "timings": self.timings}


def _listed(value) -> list:
    return value if isinstance(value, list) else [value]


def run_recipe(recipe: dict, *, overwrite: bool = False, progress: bool = True, log=print,
               command: str = "slimlm run", recipe_path: str | None = None, trust_remote_code: bool = False) -> dict:
    """Run a validated recipe (see ``load_recipe``; ``recipe_path``: its file, which the output
    may not hold); returns {"results", "report", "table", "out"}. The teacher's own Python code
    runs only with ``trust_remote_code`` (the command line's ``--trust-remote-code``, never a
    recipe field)."""
    start = time.perf_counter()
    with outputs.command(command):
        summary = Pipeline(recipe, overwrite=overwrite, progress=progress, log=log, command=command,
                           recipe_path=recipe_path, trust_remote_code=trust_remote_code).run()
    summary["seconds"] = time.perf_counter() - start
    return summary
