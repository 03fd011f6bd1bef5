"""``Pipeline``: runs a validated recipe stage by stage, skipping the stages whose outputs are
already there and valid (see ``slimlm.recipes``)."""
from __future__ import annotations

import copy
import os
import time

import torch

from slimlm import outputs
from slimlm.recipes import stages
from slimlm.errors import InputError

RECIPE_COPY = "recipe.yaml"


class Pipeline:
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
        self.device = recipe["device"] or stages.default_device()
        self.dtype = stages.resolve_dtype(recipe["dtype"], self.device)
        self.timings: dict[str, float] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    # ---------------------------------------------------------------- setup
    def _check_output(self) -> bool:
        """Refuse an output folder that is, holds or sits inside an input, one of another
        recipe (unless ``overwrite``) and one slimlm did not make (always); nothing is written.
        Returns whether the folder must be cleared (another recipe's run, ``overwrite``)."""
        import yaml

        data = self.recipe["data"]
        inputs = {"teacher": self.recipe["teacher"], "training data": data["train"],
                  "held-out data": data["heldout"], "recipe": self.recipe_path}
        outputs.check_output(self.out, True, inputs, what="output folder")
        if not (os.path.isdir(self.out) and os.listdir(self.out)):
            return False
        recipe_path = self.path(RECIPE_COPY)
        if not os.path.isfile(recipe_path):
            raise InputError(f"output folder {self.out} holds files that are not a slimlm run; choose another out")
        with open(recipe_path, encoding="utf-8") as handle:
            previous = yaml.safe_load(handle)
        if previous == self.recipe:
            return False
        if not self.overwrite:
            raise InputError(f"output folder {self.out} already holds a run of another recipe; pass --overwrite "
                             "to replace it")
        return True

    def _claim_output(self, clear: bool) -> None:
        """Called once every input has been checked: set another recipe's run aside
        (``overwrite``) and record this recipe, so that a rerun of it resumes. The run set
        aside is deleted only when this one completes: a failed or interrupted replacement
        loses no finished result (the new run resumes where it stopped)."""
        import yaml

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
        os.makedirs(self.out, exist_ok=True)
        outputs.write_text(self.path(RECIPE_COPY), yaml.safe_dump(self.recipe, sort_keys=False))

    def _data(self, tokenizer):
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

    # ------------------------------------------------------------------ run
    def run(self) -> dict:
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model, load_tokenizer

        recipe = self.recipe
        # Every input is checked before anything is written (even recipe.yaml), so a failed
        # run leaves no claim on its output folder.
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
        teacher_fp = model_fingerprint(teacher)
        # A target the model cannot meet fails now, not after the importance pass.
        from slimlm.surgery import plan

        try:
            plan(teacher, recipe["target"])
        except (ValueError, TypeError, OverflowError) as error:
            raise InputError(f"target: {error}") from None
        train_texts, heldout_texts = self._data(tokenizer)
        prompts = None
        if recipe["synthetic"] is not None:
            from slimlm.distill.generate import prompts_from_texts

            prompts = prompts_from_texts(train_texts, max_prompts=recipe["synthetic"]["num_prompts"])
            if not prompts:
                raise InputError("no prompts could be cut from data.train for the synthetic stage")
        self._claim_output(clear)
        self.timings["setup"] = time.perf_counter() - started

        # importance
        section = recipe["importance"]
        scores_dir = self.path("scores")
        started = time.perf_counter()
        importance_inputs = {"teacher": teacher_fp, "train": stages.texts_digest(train_texts), "settings": section,
                             "seed": recipe["seed"]}
        if self._stage("importance", stages.scores_state(scores_dir, teacher, importance_inputs), scores_dir):
            calibration = stages.to_blocks(train_texts, tokenizer, section["seq_len"], model=teacher)
            scores = stages.importance_stage(
                teacher, calibration, scores_dir, metrics=section["metrics"], depth=section["depth"],
                num_samples=section["num_samples"], batch_size=section["batch_size"], seed=recipe["seed"],
                loss_drop_samples=section["loss_drop_samples"], progress=self.progress, inputs=importance_inputs)
        else:
            scores = stages.load_scores(scores_dir, model=teacher)
        self.timings["importance"] = time.perf_counter() - started

        # prune
        pruned_dir = self.path("pruned")
        plan_path = self.path("plan.txt")
        started = time.perf_counter()
        from slimlm.importance.scores import SCORES_FILE

        prune_inputs = {"teacher": teacher_fp, "target": recipe["target"],
                        "scores": outputs.file_digest(os.path.join(scores_dir, SCORES_FILE))}
        if self._stage("prune", stages.pruned_state(pruned_dir, teacher_fp, prune_inputs), pruned_dir) \
                or not os.path.isfile(plan_path):
            _, the_plan = stages.prune_stage(copy.deepcopy(teacher), scores, recipe["target"], pruned_dir,
                                             tokenizer=tokenizer, overwrite=True, inputs=prune_inputs)
            outputs.write_text(plan_path, the_plan.table() + "\n")
        with open(plan_path, encoding="utf-8") as handle:
            plan_text = handle.read().rstrip()
        self.timings["prune"] = time.perf_counter() - started

        # synthetic data
        synthetic_texts = None
        mix_fraction = 0.0
        if recipe["synthetic"] is not None:
            section = recipe["synthetic"]
            synthetic_path = self.path("synthetic.jsonl")
            settings = dict(max_new_tokens=section["max_new_tokens"], temperature=section["temperature"],
                            top_p=section["top_p"], batch_size=section["batch_size"], seed=recipe["seed"],
                            chat_template=True if section["chat"] else None)
            synthetic_inputs = stages.synthetic_inputs(teacher, prompts, **settings)
            started = time.perf_counter()
            if self._stage("synthetic", stages.synthetic_state(synthetic_path, synthetic_inputs), synthetic_path):
                dataset = stages.generate_stage(teacher, tokenizer, prompts, synthetic_path, progress=self.progress,
                                                log=self.log, **settings)
            else:
                from slimlm.distill.generate import SyntheticDataset

                dataset = SyntheticDataset.load(synthetic_path)
            synthetic_texts = dataset.texts()
            mix_fraction = section["mix"]
            self.timings["synthetic"] = time.perf_counter() - started

        # distill
        section = recipe["distill"]
        distilled_dir = self.path("distilled")
        student = load_model(pruned_dir, dtype=torch.float32 if self.device == "cpu" else self.dtype)
        started = time.perf_counter()
        training_args = []
        for key, value in section["training_args"].items():
            training_args += [f"--{key}", str(value)]
        if self.device == "cpu":
            training_args = ["--use_cpu", "true"] + training_args
        settings = dict(synthetic_texts=synthetic_texts, mix_fraction=mix_fraction, seq_len=section["seq_len"],
                        max_tokens=section["max_tokens"], batch_size=section["batch_size"],
                        learning_rate=section["lr"], temperature=section["temperature"], beta=section["beta"],
                        kd_weight=section["kd_weight"], ce_weight=section["ce_weight"], seed=recipe["seed"],
                        training_args=training_args)
        distill_inputs = stages.distill_inputs(teacher, student, train_texts, **settings)
        if self._stage("distill", stages.distilled_state(distilled_dir, distill_inputs), distilled_dir):
            # Checkpoints of a run of other inputs (a changed teacher, data or setting) are stale
            # in this folder the recipe owns: they are deleted, not resumed.
            _, log_history = stages.distill_stage(
                teacher, student, tokenizer, train_texts, distilled_dir, max_minutes=section["max_minutes"],
                overwrite=True, clear_stale_checkpoints=True, disable_tqdm=not self.progress, log=self.log,
                **settings)
        else:
            log_history = stages.read_json(os.path.join(distilled_dir, stages.DISTILL_RECORD))["log_history"]
        self.timings["distill"] = time.perf_counter() - started
        distill_record = stages.read_json(os.path.join(distilled_dir, stages.DISTILL_RECORD))
        del student

        # evaluate
        results = self._evaluate(teacher, tokenizer, heldout_texts,
                                 {"teacher": recipe["teacher"], "pruned": pruned_dir, "distilled": distilled_dir})

        # report
        from slimlm.report import write_report

        notes = {"command": self.command, "teacher": recipe["teacher"], "target": recipe["target"],
                 "data": f"{len(train_texts)} training documents, {len(heldout_texts)} held-out documents "
                         f"(never used for calibration or training)",
                 "distillation": f"{distill_record['steps']} steps, {distill_record['tokens_seen']:,} tokens "
                                 f"(budget {section['max_tokens'] or '-'} tokens / {section['max_minutes'] or '-'} min), "
                                 f"{distill_record['train_seconds'] or 0:.0f} s, lr {section['lr']}, seq_len "
                                 f"{section['seq_len']}, temperature {section['temperature']}, beta {section['beta']}",
                 "sizes on disk": "a .gguf teacher is stored 4-bit quantized (Q4_1); students as saved (float32 "
                                  "safetensors on CPU)" if str(recipe["teacher"]).endswith(".gguf") else "as saved",
                 "device": f"{self.device} ({torch.get_num_threads()} threads)",
                 "stage seconds": ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())}
        report = write_report(self.path("report"), results=results, scores=scores, log_history=log_history,
                              plan_text=plan_text, notes=notes, title=recipe["report"]["title"])
        previous = outputs.aside_path(self.out)
        if os.path.lexists(previous):
            self.log(f"[report] this run is complete: deleting the run it replaced ({previous})")
            outputs.remove(previous)
        return {"results": results, "report": report, "table": report["table"], "out": self.out,
                "timings": self.timings}

    def _evaluate(self, teacher, tokenizer, heldout_texts, specs: dict) -> list[dict]:
        from slimlm.evaluate import evaluate_model
        from slimlm.fingerprint import model_fingerprint
        from slimlm.models import load_model

        section = self.recipe["eval"]
        blocks = stages.to_blocks(heldout_texts, tokenizer, section["seq_len"], model=teacher)
        blocks = blocks.select(range(min(len(blocks), section["max_blocks"])))
        eval_path = self.path("eval.json")
        started = time.perf_counter()
        models = {"teacher": teacher}
        for name in ("pruned", "distilled"):
            models[name] = load_model(specs[name], dtype=self.dtype, device=self.device)
        key = {"heldout": stages.texts_digest(heldout_texts), "settings": section,
               "fingerprints": {name: model_fingerprint(model) for name, model in models.items()},
               "distilled_record": stages.read_json(os.path.join(specs["distilled"], stages.DISTILL_RECORD)).get(
                   "train_seconds")}
        previous = stages.read_json(eval_path)
        state = None if previous is not None and previous.get("key") == stages.read_json_roundtrip(key) else (
            "missing" if previous is None else "made for other models or data")
        if self._stage("eval", state, eval_path):
            results = []
            for name, model in models.items():
                results.append(evaluate_model(model, blocks, tokenizer=tokenizer, prompts=section["prompts"],
                                              max_new_tokens=section["max_new_tokens"], batch_size=section["batch_size"],
                                              spec=specs[name], progress=self.progress, name=name))
            stages.write_json(eval_path, {"key": key, "results": results})
        else:
            results = previous["results"]
        self.timings["eval"] = time.perf_counter() - started
        return results
