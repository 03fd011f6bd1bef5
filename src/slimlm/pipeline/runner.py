"""``Pipeline``: runs a validated recipe stage by stage, one method per stage, skipping the
stages whose outputs are already there and valid (see ``slimlm.pipeline``)."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time

import torch

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.models import default_device, resolve_dtype
from slimlm.pipeline import distill, importance, prune, synthetic
from slimlm.pipeline import search as search_stage
from slimlm.pipeline.records import DISTILL_RECORD, read_json, read_json_roundtrip, texts_digest

RECIPE_COPY = "recipe.yaml"
# The least distillation time distill.finish_by_minutes leaves a run whose earlier stages overran.
MIN_DISTILL_MINUTES = 1.0


class Pipeline:
    """A validated recipe's run in its ``out`` folder: ``run`` calls one method per stage, in
    order (setup, importance, search, prune, synthetic, correct_teacher, distill, evaluate, speed,
    report); each logs whether
    its output is already there and made from the same inputs, and then skips or runs."""

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
                  "held-out data": data["heldout"], "general held-out data": data["general"],
                  "recipe": self.recipe_path}
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

    def _data(self):
        from slimlm.data import load_texts

        data = self.recipe["data"]
        train = load_texts(data["train"], text_field=data["text_field"])
        if data["heldout"] is not None:
            heldout = load_texts(data["heldout"], text_field=data["text_field"])
        else:
            if len(train) < 2:
                raise InputError("data.train holds one document: give data.heldout or more documents to split")
            # Split whole documents so no held-out text is ever seen in calibration or training.
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.recipe["seed"])).tolist()
            count = min(len(train) - 1, max(1, round(data["heldout_fraction"] * len(train))))
            heldout = [train[i] for i in sorted(order[:count])]
            train = [train[i] for i in sorted(order[count:])]
        return train, heldout

    def _stage(self, name: str, state: str | None, output: str) -> bool:
        """Log the decision; True when the stage must run."""
        if state is None:
            self.log(f"[{name}] skipped: {output} is already done")
            return False
        self.log(f"[{name}] running ({os.path.relpath(output, self.out)}: {state})")
        return True

    @contextlib.contextmanager
    def _timed(self, name: str):
        started = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - started

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        """Every stage in order; returns {"results", "report", "table", "out", "timings"}. When
        a stage fails (or is interrupted) in a run that was replacing another recipe's finished
        run, that run is put back: the output folder holds a finished run or a run of this
        recipe resuming, never a half-finished replacement in place of a finished run."""
        self.setup()
        try:
            scores = self.importance()
            searched = self.search(scores)
            plan_text = self.prune(scores, searched)
            synthetic_texts = self.synthetic()
            teacher = self.correct_teacher()
            log_history = self.distill(synthetic_texts, teacher)
            results = self.evaluate()
            speed = self.speed()
            return self.report(scores, plan_text, log_history, results, speed, searched)
        except BaseException:
            self._restore_previous()
            raise

    def setup(self) -> None:
        """Check every input and load the teacher, its tokenizer and the data before anything is
        written (even recipe.yaml), so a failed run leaves no claim on its output folder."""
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model, load_tokenizer
        from slimlm.surgery import plan
        from slimlm.search import search_candidates

        recipe = self.recipe
        clear = self._check_output()
        torch.manual_seed(recipe["seed"])
        with self._timed("setup"):
            self.log(f"[setup] loading teacher {recipe['teacher']}")
            try:
                self.teacher = load_model(recipe["teacher"], dtype=self.dtype, device=self.device,
                                          trust_remote_code=self.trust_remote_code)
                self.tokenizer = load_tokenizer(recipe["teacher"], trust_remote_code=self.trust_remote_code)
            except FileNotFoundError as error:
                raise InputError(f"teacher: {error}") from None
            self.teacher_fp = model_fingerprint(self.teacher)
            # A target the model cannot meet fails now, not after the importance pass.
            try:
                if recipe["search"] is None:
                    plan(self.teacher, recipe["target"])
                else:
                    section = recipe["search"]
                    search_candidates(self.teacher, recipe["target"], space=section["space"], top_n=section["top_n"],
                                      top_k=section["top_k"])
            except (ValueError, TypeError, OverflowError) as error:
                raise InputError(f"{'search' if recipe['search'] else 'target'}: {error}") from None
            self.train_texts, self.heldout_texts = self._data()
            self.general_texts = None
            if recipe["data"]["general"] is not None:
                from slimlm.data import load_texts

                self.general_texts = load_texts(recipe["data"]["general"], text_field=recipe["data"]["text_field"])
            self.rerank_tokens = 0
            if recipe["search"] is not None:
                self.search_blocks, train_blocks = search_stage.search_blocks(
                    self.train_texts, self.tokenizer, recipe["search"], recipe["seed"], self.teacher)
                self.rerank_tokens = search_stage.rerank_tokens(recipe["search"], train_blocks)
                search_stage.check_token_budget(recipe["distill"]["max_tokens"], self.rerank_tokens)
            self.prompts = None
            if recipe["synthetic"] is not None:
                from slimlm.distill.generate import prompts_from_texts

                self.prompts = prompts_from_texts(self.train_texts, max_prompts=recipe["synthetic"]["num_prompts"])
                if not self.prompts:
                    raise InputError("no prompts could be cut from data.train for the synthetic stage")
            self._check_stage_settings()
            self._claim_output(clear)

    def _check_stage_settings(self) -> None:
        """The checks the later stages make on their settings, made now, before the output
        folder is claimed or another run set aside (InputError naming the recipe field)."""
        from slimlm.distill.training import training_arguments
        from slimlm.pipeline.correct import check_correction_settings

        recipe = self.recipe
        if recipe["synthetic"] is not None:
            synthetic.check_synthetic(self.teacher, self.tokenizer, self.prompts, **self._synthetic_settings())
        section = recipe["distill"]  # its own values were checked with the recipe (DistillOptions)
        try:
            training_arguments(self._distill_flags(section), output_dir=self.path("distilled.checkpoints"),
                               batch_size=section["batch_size"], learning_rate=section["lr"], seed=recipe["seed"])
        except InputError as error:
            raise InputError(f"distill.training_args: {error}") from None
        correction = recipe["correct_teacher"]
        if correction is not None:
            check_correction_settings(tokens=correction["tokens"], learning_rate=correction["lr"] or section["lr"] / 10,
                                      seq_len=correction["seq_len"] or section["seq_len"],
                                      batch_size=correction["batch_size"] or section["batch_size"])

    def _distill_flags(self, section: dict) -> list[str]:
        """The distill section's ``training_args`` as command-line flags (``--use_cpu`` on a CPU)."""
        flags = ["--use_cpu", "true"] if self.device == "cpu" else []
        for key, value in section["training_args"].items():
            flags += [f"--{key}", str(value)]
        return flags

    def _synthetic_settings(self) -> dict:
        from slimlm.distill.options import GenerationOptions

        return GenerationOptions(**self.recipe["synthetic"]).sampling(self.recipe["seed"])

    def importance(self):
        """Scores of the teacher on calibration blocks of the training data (``scores/``)."""
        from slimlm.data import tokenize_blocks
        from slimlm.importance.options import ImportanceOptions

        section = self.recipe["importance"]
        scores_dir = self.path("scores")
        with self._timed("importance"):
            inputs = {"teacher": self.teacher_fp, "train": texts_digest(self.train_texts), "settings": section,
                      "seed": self.recipe["seed"]}
            if not self._stage("importance", importance.scores_stale_reason(scores_dir, self.teacher, inputs), scores_dir):
                return importance.load_scores(scores_dir, model=self.teacher)
            calibration = tokenize_blocks(self.train_texts, self.tokenizer, section["seq_len"], model=self.teacher)
            return importance.importance_stage(self.teacher, calibration, scores_dir, ImportanceOptions(**section),
                                               seed=self.recipe["seed"], progress=self.progress, inputs=inputs,
                                               fingerprint=self.teacher_fp)

    def search(self, scores) -> dict | None:
        """The student shape that distills best at the recipe's budget (``search/``: search.json,
        search.csv, search.png, winner_target.json, winner/), when the recipe has a search
        section; its search.json record (candidates, winner, phase_seconds), None otherwise.
        ``slimlm.search`` resumes on its own: finished candidates are read back."""
        section = self.recipe["search"]
        if section is None:
            return None
        out = self.path(search_stage.SEARCH_DIR)
        with self._timed("search"):
            done = os.path.isfile(os.path.join(out, "search.json"))
            self.log(f"[search] running ({search_stage.SEARCH_DIR}: "
                     f"{'resuming: finished candidates are read back' if done else 'missing'})")
            result = search_stage.search_stage(self.teacher, scores, self.recipe["target"], self.search_blocks, out,
                                               section=section, distill=self.recipe["distill"],
                                               seed=self.recipe["seed"], device=self.device,
                                               reconstruct=self._reconstruction(), log=self.log)
            record = search_stage.winner_record(out)
            record["target"] = dataclasses.asdict(result.target)
            record["rerank_tokens"] = self.rerank_tokens
            return record

    def prune(self, scores, searched: dict | None = None) -> str:
        """A copy of the teacher pruned to the target — the search's winner when there was one —
        (``pruned/``); returns the plan's table (``plan.txt``)."""
        from slimlm.importance.scores import SCORES_FILE

        pruned_dir = self.path("pruned")
        plan_path = self.path("plan.txt")
        target = searched["target"] if searched is not None else self.recipe["target"]
        with self._timed("prune"):
            inputs = {"teacher": self.teacher_fp, "target": target,
                      "scores": outputs.file_digest(os.path.join(self.path("scores"), SCORES_FILE)),
                      "save_dtype": self.recipe["save_dtype"]}
            if self.recipe["reconstruct"] is not None:  # (absent otherwise: older run folders stay valid)
                inputs["reconstruct"] = {**self.recipe["reconstruct"], "train": texts_digest(self.train_texts),
                                         "seq_len": self.recipe["importance"]["seq_len"]}
            if self._stage("prune", prune.pruned_stale_reason(pruned_dir, self.teacher_fp, inputs), pruned_dir) \
                    or not os.path.isfile(plan_path):
                _, the_plan = prune.prune_stage(copy.deepcopy(self.teacher), scores, target, pruned_dir,
                                                tokenizer=self.tokenizer, overwrite=True, inputs=inputs,
                                                save_dtype=self.recipe["save_dtype"],
                                                reconstruct=self._reconstruction())
                outputs.write_text(plan_path, the_plan.table() + "\n")
            with open(plan_path, encoding="utf-8") as handle:
                return handle.read().rstrip()

    def _reconstruction(self):
        """The teacher's ``reconstruction_stats`` on the first ``reconstruct.num_samples`` blocks of
        ``importance.seq_len`` tokens of the training text (computed once per run, in memory:
        they are a few hundred MB), or None when the recipe has no reconstruct section."""
        section = self.recipe["reconstruct"]
        if section is None:
            return None
        if getattr(self, "reconstruction", None) is None:
            from slimlm.data import tokenize_blocks
            from slimlm.surgery.reconstruct import reconstruction_stats

            started = time.perf_counter()
            calibration = tokenize_blocks(self.train_texts, self.tokenizer, self.recipe["importance"]["seq_len"],
                                          model=self.teacher)
            self.reconstruction = reconstruction_stats(
                self.teacher, calibration, batch_size=self.recipe["importance"]["batch_size"],
                num_samples=section["num_samples"], ridge=section["ridge"])
            seconds = time.perf_counter() - started  # counted in the stage that asked (search or prune)
            self.log(f"[reconstruct] o_proj/down_proj input statistics of {self.reconstruction.tokens:,} tokens "
                     f"in {seconds:.0f} s (ridge {section['ridge']:g})")
        return self.reconstruction

    def synthetic(self) -> list[str] | None:
        """The teacher's generations from prompts of the training data (``synthetic.jsonl``);
        None when the recipe has no synthetic section."""
        section = self.recipe["synthetic"]
        if section is None:
            return None
        synthetic_path = self.path("synthetic.jsonl")
        settings = self._synthetic_settings()
        inputs = synthetic.synthetic_inputs(self.teacher, self.prompts, **settings)
        with self._timed("synthetic"):
            if self._stage("synthetic", synthetic.synthetic_stale_reason(synthetic_path, inputs), synthetic_path):
                dataset = synthetic.generate_stage(self.teacher, self.tokenizer, self.prompts, synthetic_path,
                                                   progress=self.progress, log=self.log, **settings)
            else:
                from slimlm.distill.generate import SyntheticDataset

                dataset = SyntheticDataset.load(synthetic_path)
            return dataset.texts()

    def correct_teacher(self):
        """The teacher to distill from: Minitron's teacher correction (``teacher-corrected/``,
        the teacher fine-tuned ``correct_teacher.tokens`` tokens with CE on the training text)
        when the recipe has that section, else the teacher itself. Evaluation keeps the original
        teacher as the reference."""
        section = self.recipe["correct_teacher"]
        if section is None:
            return self.teacher
        from slimlm.distill.training import student_precision_flags
        from slimlm.pipeline.correct import correct_teacher_stage

        distill_section = self.recipe["distill"]
        # The correction trains as the distillation's student does (bf16 mixed precision where
        # native with student_precision auto: faster, the same corrected teacher; BENCHMARKS.md).
        flags = student_precision_flags(distill_section["student_precision"],
                                        ["--use_cpu", "true"] if self.device == "cpu" else [],
                                        log=lambda line: self.log(line.replace("[distill]", "[correct_teacher]")))
        with self._timed("correct_teacher"):
            return correct_teacher_stage(
                self.teacher, self.tokenizer, self.train_texts, self.path("teacher-corrected"),
                tokens=section["tokens"], seq_len=section["seq_len"] or distill_section["seq_len"],
                batch_size=section["batch_size"] or distill_section["batch_size"],
                learning_rate=section["lr"] or distill_section["lr"] / 10, seed=self.recipe["seed"],
                training_args=flags, overwrite=True,
                save_dtype=self.recipe["save_dtype"], disable_tqdm=not self.progress,
                log=lambda line: self.log(line.replace("[correct]", "[correct_teacher]")))

    def distill(self, synthetic_texts: list[str] | None, teacher=None) -> list[dict]:
        """The pruned student distilled from the teacher (``distilled/``), saved in the recipe's
        ``save_dtype`` (auto: the pruned model's, i.e. the teacher's source dtype); returns its log
        history. After a search with re-ranking the student is the winner's short-distilled one
        (``search/winner``) and trains ``max_tokens`` minus the tokens it has already seen.
        ``teacher``: the one to distill from (default: the recipe's; ``correct_teacher``'s)."""
        from slimlm.models import load_model, save_dtype
        from slimlm.distill.options import DistillOptions

        teacher = teacher if teacher is not None else self.teacher
        section = self.recipe["distill"]
        distilled_dir = self.path("distilled")
        start = self.path("pruned")
        max_tokens = section["max_tokens"]
        if self.rerank_tokens:
            from slimlm.search.records import WINNER_DIR

            start = os.path.join(self.path(search_stage.SEARCH_DIR), WINNER_DIR)
            max_tokens = max_tokens - self.rerank_tokens if max_tokens is not None else None
            self.log(f"[distill] continuing from the search's winner ({os.path.relpath(start, self.out)}, "
                     f"{self.rerank_tokens:,} tokens distilled)")
        student = load_model(start, dtype=torch.float32 if self.device == "cpu" else self.dtype)
        # auto: the teacher's source dtype (the pruned model's), also for a student started from
        # the search's winner, which is kept in the dtype it trained in.
        saving = self.recipe["save_dtype"] if self.recipe["save_dtype"] != "auto" else \
            str(save_dtype(self.teacher, "auto")).removeprefix("torch.")
        options = DistillOptions(**section).distillation_options()
        if section["hidden_loss_weight"] > 0:
            layer_map = distill.pruned_layer_map(start, student, teacher)
            if layer_map is not None:  # each student layer against the teacher layer it was cut from
                options["layer_map"] = layer_map
        with self._timed("distill"):
            max_minutes = self._distill_minutes(section)
            training_args = self._distill_flags(section)
            mix_fraction = self.recipe["synthetic"]["mix"] if synthetic_texts is not None else 0.0
            settings = dict(synthetic_texts=synthetic_texts, mix_fraction=mix_fraction, seq_len=section["seq_len"],
                            max_tokens=max_tokens, batch_size=section["batch_size"],
                            learning_rate=section["lr"], temperature=section["temperature"], beta=section["beta"],
                            kd_weight=section["kd_weight"], ce_weight=section["ce_weight"], seed=self.recipe["seed"],
                            teacher_precision=section["teacher_precision"],
                            student_precision=section["student_precision"],
                            fit_to_time=section["fit_to_time"],
                            distillation_options=options,
                            training_args=training_args)
            inputs = distill.distill_inputs(teacher, student, self.train_texts, **settings)
            saved = distill.with_save_dtype(inputs, save_dtype(student, saving))
            if not self._stage("distill", distill.distilled_stale_reason(distilled_dir, saved), distilled_dir):
                return read_json(os.path.join(distilled_dir, DISTILL_RECORD))["log_history"]
            # Checkpoints of a run of other inputs (a changed teacher, data or setting) are stale
            # in this folder the recipe owns: they are deleted, not resumed.
            _, log_history = distill.distill_stage(
                teacher, student, self.tokenizer, self.train_texts, distilled_dir,
                max_minutes=max_minutes, extra_record={"max_minutes": max_minutes},
                overwrite=True, clear_stale_checkpoints=True,
                disable_tqdm=not self.progress, save_dtype=saving, log=self.log,
                eval_texts=self._eval_texts(), eval_steps=section["eval_steps"], eval_blocks=section["eval_blocks"],
                **settings)
            return log_history

    def _distill_minutes(self, section: dict) -> float | None:
        """``distill.max_minutes``, shortened so that distillation ends ``distill.finish_by_minutes``
        after this invocation started (at least ``MIN_DISTILL_MINUTES``: a run whose earlier
        stages overran still distills, and says so)."""
        cap, finish_by = section["max_minutes"], section["finish_by_minutes"]
        if finish_by is None:
            return cap
        elapsed = (time.monotonic() - self.started) / 60
        left = finish_by - elapsed
        minutes = max(left, MIN_DISTILL_MINUTES) if cap is None else min(cap, max(left, MIN_DISTILL_MINUTES))
        if cap is None or minutes < cap:
            note = f"; {left:.1f} left, at least {MIN_DISTILL_MINUTES}" if left < MIN_DISTILL_MINUTES else ""
            self.log(f"[distill] {elapsed:.1f} min into the run, finish_by_minutes {finish_by:g}: distillation capped "
                     f"at {minutes:.1f} min" + (f" (max_minutes {cap:g})" if cap is not None else "") + note)
        return minutes

    @staticmethod
    def _precision_note(section: dict, distill_record: dict) -> str:
        """'teacher precision auto (bfloat16), student precision auto (bf16)': as asked, and what
        it resolved to on the machine that trained (older records lack the latter)."""
        used = distill_record.get("precision_used") or {}
        return ", ".join(f"{who} precision {section[who + '_precision']}" + (f" ({used[who]})" if used.get(who) else "")
                         for who in ("teacher", "student"))

    def _eval_texts(self) -> dict:
        """The held-out sets scored along the distillation (``distill.eval_steps``)."""
        sets = {"heldout": self.heldout_texts}
        if self.general_texts is not None:
            sets["general"] = self.general_texts
        return sets

    def evaluate(self) -> list[dict]:
        """Perplexity, speed and samples of the teacher, the pruned and the distilled model on
        the held-out blocks, and perplexity on the general held-out set's when the recipe has
        one (``eval.json``, keyed by the models' fingerprints and the data)."""
        from slimlm.data import tokenize_blocks
        from slimlm.evaluate import evaluate_model
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model

        section = {key: value for key, value in self.recipe["eval"].items() if not key.startswith("speed")}
        specs = {"teacher": self.recipe["teacher"], "pruned": self.path("pruned"), "distilled": self.path("distilled")}
        blocks = tokenize_blocks(self.heldout_texts, self.tokenizer, section["seq_len"], model=self.teacher)
        blocks = blocks.select(range(min(len(blocks), section["max_blocks"])))
        general = None
        if self.general_texts is not None:
            general = tokenize_blocks(self.general_texts, self.tokenizer, section["seq_len"], model=self.teacher)
            general = general.select(range(min(len(general), section["max_blocks"])))
        eval_path = self.path("eval.json")
        with self._timed("eval"):
            models = {"teacher": self.teacher}
            for name in ("pruned", "distilled"):
                models[name] = load_model(specs[name], dtype=self.dtype, device=self.device)
            key = {"heldout": texts_digest(self.heldout_texts), "settings": section,
                   "general": texts_digest(self.general_texts) if self.general_texts is not None else None,
                   "fingerprints": {name: model_fingerprint(model) for name, model in models.items()},
                   "distilled_record": read_json(os.path.join(specs["distilled"], DISTILL_RECORD)).get(
                       "train_seconds")}
            previous = read_json(eval_path)
            state = None if previous is not None and previous.get("key") == read_json_roundtrip(key) else (
                "missing" if previous is None else "made for other models or data")
            if not self._stage("eval", state, eval_path):
                return previous["results"]
            results = [evaluate_model(model, blocks, tokenizer=self.tokenizer, prompts=section["prompts"],
                                      max_new_tokens=section["max_new_tokens"], batch_size=section["batch_size"],
                                      spec=specs[name], progress=self.progress, name=name, general_blocks=general)
                       for name, model in models.items()]
            outputs.write_json(eval_path, {"key": key, "results": results})
            return results

    def speed(self) -> dict | None:
        """Inference figures of the teacher and the distilled student side by side
        (``slimlm.speed.speed_report``: prefill/decode tokens/s at batch 1 and 8, TTFT, TPOT,
        memory with the KV cache, size on disk, ratios) in ``speed.json``, when the recipe asks
        (``eval.speed``); None otherwise. Timings are of this machine at the time of the run:
        the file is kept while the models and settings are the same."""
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model
        from slimlm.speed import speed_report

        section = self.recipe["eval"]
        if not section["speed"]:
            return None
        specs = {"teacher": self.recipe["teacher"], "distilled": self.path("distilled")}
        speed_path = self.path("speed.json")
        with self._timed("speed"):
            models = {"teacher": self.teacher, "distilled": load_model(specs["distilled"], dtype=self.dtype,
                                                                       device=self.device)}
            settings = {"prompt_tokens": section["speed_prompt_tokens"], "new_tokens": section["speed_new_tokens"],
                        "rounds": section["speed_rounds"]}
            key = {"settings": settings, "device": self.device, "dtype": str(self.dtype),
                   "fingerprints": {name: model_fingerprint(model) for name, model in models.items()}}
            previous = read_json(speed_path)
            state = None if previous is not None and previous.get("key") == read_json_roundtrip(key) else (
                "missing" if previous is None else "made for other models or settings")
            if not self._stage("speed", state, speed_path):
                return previous["report"]
            report = read_json_roundtrip(speed_report(models, specs=specs, tokenizer=self.tokenizer, **settings))
            outputs.write_json(speed_path, {"key": key, "report": report})
            return report

    def report(self, scores, plan_text: str, log_history: list[dict], results: list[dict],
               speed: dict | None = None, searched: dict | None = None) -> dict:
        """The report (``report/``); once it is written the run this one replaced is deleted."""
        from slimlm.report import write_report

        recipe = self.recipe
        section = recipe["distill"]
        distill_record = read_json(os.path.join(self.path("distilled"), DISTILL_RECORD))
        notes = {"command": self.command, "teacher": recipe["teacher"], "target": recipe["target"],
                 "data": f"{len(self.train_texts)} training documents, {len(self.heldout_texts)} held-out documents "
                         f"(never used for calibration or training)" + (
                             f", {len(self.general_texts)} general held-out documents (another register: neither "
                             "the training text nor its domain)" if self.general_texts is not None else ""),
                 "distillation": f"{distill_record['steps']} steps, {distill_record['tokens_seen']:,} tokens "
                                 f"(budget {section['max_tokens'] or '-'} tokens / {self._minutes_note(section, distill_record)} min"
                                 + (f", schedule fitted to the time: {distill_record['scheduled_steps']} steps"
                                    if section["fit_to_time"] and distill_record.get("scheduled_steps") else "")
                                 + "), "
                                 f"{distill_record['train_seconds'] or 0:.0f} s"
                                 + (f" ({distill_record['tokens_seen'] / distill_record['train_seconds']:.0f} tokens/s)"
                                    if distill_record.get("train_seconds") else "")
                                 + f", lr {section['lr']}, seq_len "
                                 f"{section['seq_len']}, temperature {section['temperature']}, beta {section['beta']}, "
                                 + self._precision_note(section, distill_record) + (
                                     f", hidden-state loss {section['hidden_loss_weight']} "
                                     f"({section['hidden_loss_schedule']})" if section['hidden_loss_weight'] else "")
                                 + (f", on-policy fraction {section['on_policy_fraction']}"
                                    if section['on_policy_fraction'] else "")
                                 + (", embeddings and LM head frozen" if section["freeze_embeddings"] else "")
                                 + (f", from the teacher corrected on {recipe['correct_teacher']['tokens']:,} tokens"
                                    if recipe['correct_teacher'] else ""),
                 "sizes on disk": self._sizes_note(),
                 "device": f"{self.device} ({torch.get_num_threads()} threads)",
                 "stage seconds": ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())}
        report = write_report(self.path("report"), results=results, scores=scores, log_history=log_history,
                              plan_text=plan_text, notes=notes, title=recipe["report"]["title"], speed=speed,
                              search=searched)
        previous = outputs.aside_path(self.out)
        if os.path.lexists(previous):
            self.log(f"[report] this run is complete: deleting the run it replaced ({previous})")
            outputs.remove(previous)
        return {"results": results, "report": report, "table": report["table"], "out": self.out,
                "timings": self.timings}


    @staticmethod
    def _minutes_note(section: dict, distill_record: dict) -> str:
        """The distillation's time cap as the report states it: the recipe's max_minutes, and
        what finish_by_minutes shortened it to in the run that made the student."""
        used = distill_record.get("max_minutes")
        if section["finish_by_minutes"] is None or used is None:
            return f"{section['max_minutes'] or '-'}"
        if section["max_minutes"] is not None and used >= section["max_minutes"]:
            return f"{section['max_minutes']:g}"
        return f"{used:.1f} (finish_by_minutes {section['finish_by_minutes']:g})"

    def _sizes_note(self) -> str:
        """How the report's sizes on disk are stored: the teacher's format, the students' dtype."""
        config = read_json(os.path.join(self.path("distilled"), "config.json")) or {}
        saved = config.get("dtype") or config.get("torch_dtype") or "float32"
        teacher = "a .gguf teacher is stored 4-bit quantized (Q4_1); " if str(self.recipe["teacher"]).endswith(
            ".gguf") else ""
        return f"{teacher}students as saved: {saved} safetensors (save_dtype {self.recipe['save_dtype']})"


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
