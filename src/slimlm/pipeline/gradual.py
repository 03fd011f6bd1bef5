"""Gradual pruning: reach the target in ``schedule.steps`` cuts, each followed by distillation,
instead of one cut (``slimlm.search.schedule`` declares the schedule and its pure rules).

Step k (1-based) starts from the model the previous step made (the teacher for step 1):

1. scores it: on its own activations (``rescore``), or the teacher's scores of the units it kept;
2. searches its next shape at the step's parameter budget (the final target at the last step)
   among the shapes no larger than it in any dimension and no smaller than the floors the
   search space gives the teacher (``slimlm.search``, re-ranking by short distillation included:
   as in a one-shot search, the candidates are ranked against, and short-distilled from, the
   model being cut, here the current student);
3. cuts it to the winner's shape (``pruned``);
4. distills the cut student from the (corrected) teacher for the step's share of the tokens less
   the re-ranking tokens the winner already trained on, continuing from the winner; the
   hidden-state loss maps each student layer to the teacher layer it descends from (the maps of
   the cuts composed). Under ``distill.max_minutes`` (in a recipe, shortened to end by
   ``distill.finish_by_minutes``) the steps share the minutes as they share the tokens
   (``_GradualRun.step_minutes``), so ``fit_to_time`` fits each step's schedule to its share;
5. measures held-out perplexity after the cut and after the distillation, per split.

``out/steps/step-<k>/`` is the step's student, an ordinary Hugging Face checkpoint, with its done
record (``slimlm_step.json``); ``out/steps/step-<k>.work/`` holds what made it (``scores/``,
``search/``, ``pruned/``, ``checkpoints/``). A rerun reads finished steps back and resumes an
unfinished one inside: its scores, search, cut and distillation checkpoints are read back as
their own stages read them. ``out/gradual.json`` is the run's record (``gradual_report_lines``
renders it).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import shutil
import time

import torch

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.distill import distill_inputs, distill_stage, distilled_stale_reason, eval_blocks, \
    with_save_dtype
from slimlm.pipeline.records import DISTILL_RECORD, data_digest, has_weights, inputs_stale_reason, read_json, \
    read_json_roundtrip, texts_digest
from slimlm.pipeline.stage import RunContext, Stage
from slimlm.search.schedule import ScheduleOptions, check_not_grown, compose_layer_maps, split_tokens, step_budgets

STEPS_DIR = "steps"
RECORD_FILE = "gradual.json"
STEP_RECORD = "slimlm_step.json"
# The options fields that cap time or evaluate along the way: not part of what a step is made from.
UNRECORDED_DISTILL = ("max_tokens", "max_minutes", "finish_by_minutes", "eval_steps", "eval_blocks")


def step_dir(out: str, step: int) -> str:
    """Where step ``step``'s student is saved (an ordinary HF checkpoint)."""
    return os.path.join(out, STEPS_DIR, f"step-{step}")


def work_dir(out: str, step: int) -> str:
    """Where step ``step``'s scores, search, cut and distillation checkpoints are kept."""
    return step_dir(out, step) + ".work"


# ---------------------------------------------------------------------- plan
@dataclasses.dataclass
class SchedulePlan:
    """What a schedule will do, from its settings and the teacher alone: each step's parameter
    budget (``budgets``, the last the final target) and share of the distillation tokens
    (``shares``), the re-ranking tokens of each step's search winner (``rerank``), and the search
    space every step searches (``space``: the teacher's floors made absolute)."""

    teacher_params: int
    final_params: int
    tolerance: float
    budgets: list[int]
    shares: list[int]
    rerank: int | None
    space: object

    def as_record(self) -> dict:
        return {"teacher_params": self.teacher_params, "final_params": self.final_params,
                "tolerance": self.tolerance, "budgets": self.budgets, "token_shares": self.shares,
                "rerank_tokens": self.rerank}


def schedule_space(teacher, space):
    """``space`` (a ``SearchSpace``) with every floor made absolute on the teacher's sizes
    (``min_sizes``), so that a later step, which searches from a smaller model, keeps the
    teacher's floors instead of taking new ones from its own sizes."""
    from slimlm.architectures import model_sizes
    from slimlm.search.candidates import FLOOR_AXES

    sizes = model_sizes(teacher.config)
    current = {**sizes, "heads_per_group": sizes["num_attention_heads"] // sizes["num_key_value_heads"]}
    return dataclasses.replace(space, min_sizes={axis: space.floor(axis, current[axis]) for axis in FLOOR_AXES})


def schedule_plan(teacher, target, schedule: ScheduleOptions, search, max_tokens: int | None, *,
                  train_blocks: int | None = None) -> SchedulePlan:
    """Check a schedule against the teacher and the budget before any work (InputError, one
    line): a parameter budget (``target``: ``slimlm.search.Budget``'s fields), a token budget to
    split, step budgets that decrease strictly to the final target and lie further apart than
    the budget's tolerance (else a student meeting one step's budget may meet the next one's
    already), and steps whose share covers the search's re-ranking tokens (counted with
    ``train_blocks`` training blocks in the search; when None and ``search.rerank_tokens`` is
    unset, that count waits for the data)."""
    from slimlm.architectures import get_adapter
    from slimlm.pipeline.search import rerank_tokens
    from slimlm.search import Budget, search_candidates
    from slimlm.surgery.planning import count_parameters, meta_model, parse_param_count

    try:
        budget = Budget.coerce(target)
        budget.check()
    except (ValueError, TypeError) as error:
        raise InputError(f"target: {error}") from None
    if budget.target_params is None:
        raise InputError("schedule: each step has a parameter budget: give target.target_params (--target-params), "
                         "not a memory budget")
    if max_tokens is None:
        raise InputError("schedule: the steps share distill.max_tokens (--max-tokens): give it")
    adapter = get_adapter(teacher, "slimlm.search", "searches")
    teacher_params = count_parameters(meta_model(type(teacher), teacher.config), adapter)["total"]
    try:
        final = parse_param_count(budget.target_params, teacher_params)
    except ValueError as error:
        raise InputError(f"target: {error}") from None
    budgets = step_budgets(teacher_params, final, schedule.steps, schedule.budget_rule())
    for step, (earlier, later) in enumerate(zip(budgets, budgets[1:]), 1):
        if later >= (1 - budget.tolerance) * earlier:
            raise InputError(f"schedule: step {step + 1}'s budget {later:,} is within the tolerance "
                             f"{budget.tolerance:g} of step {step}'s {earlier:,} parameters (a student meeting one "
                             "meets the other): use fewer steps or a smaller target.tolerance")
    space = schedule_space(teacher, search.search_space())
    for step, step_budget in enumerate(budgets, 1):  # reachable from the teacher, else from no later student
        try:
            search_candidates(teacher, {"target_params": step_budget, "tolerance": budget.tolerance}, space=space,
                              top_n=search.top_n, top_k=search.top_k)
        except ValueError as error:
            raise InputError(f"schedule: step {step} ({step_budget:,} parameters): {error}") from None
    shares = split_tokens(max_tokens, schedule.steps, schedule.token_rule())
    section = search.as_record()
    rerank = None if train_blocks is None and section["rerank_tokens"] is None and section["top_k"] else \
        rerank_tokens(section, train_blocks or 0)
    for step, share in enumerate(shares, 1):
        if rerank is not None and share - rerank < 1:
            raise InputError(f"schedule: step {step}'s share of {share:,} distillation tokens does not cover its "
                             f"search's re-ranking tokens ({rerank:,}): give more distill.max_tokens, fewer steps "
                             "or a lower search.rerank_tokens")
    return SchedulePlan(teacher_params, final, budget.tolerance, budgets, shares, rerank, space)


def check_schedule_settings(ctx: RunContext) -> None:
    """A recipe's schedule checked before its run claims the output folder (``Pipeline``)."""
    from slimlm.search import SearchOptions

    recipe = ctx.recipe
    if recipe["schedule"] is None:
        return
    if recipe["search"] is None:
        raise InputError("schedule: each step's shape is chosen by the architecture search: add a search section")
    schedule_plan(ctx.teacher, recipe["target"], ScheduleOptions(**recipe["schedule"]),
                  SearchOptions(**recipe["search"]), recipe["distill"]["max_tokens"])


# -------------------------------------------------------------------- pieces
def sample_blocks(data, tokenizer, count: int, seq_len: int, seed: int, *, model):
    """``count`` blocks of ``seq_len`` tokens of ``data`` (token shards or texts) drawn with
    ``seed`` (as ``TokenShards.sample_blocks`` draws them: only those are read), as TokenBlocks."""
    from slimlm.shards import Permutation, token_blocks

    blocks = token_blocks(data, tokenizer, seq_len, model=model)
    if len(blocks) == 0:
        raise InputError(f"the training data holds no block of {seq_len} tokens")
    return blocks.select(Permutation(len(blocks), seed)(range(min(count, len(blocks)))))


def carried_scores(scores, selection, fingerprint: str):
    """The scores of a cut model's units, taken from ``scores`` of the model it was cut from by
    ``selection`` (``slimlm.surgery.selection.Selection``: the layers, channels, heads and neurons
    it kept, in their order), fingerprinted for the cut model (``fingerprint``)."""
    from slimlm.importance import ImportanceScores

    layers = torch.tensor(selection.kept_layers)
    units = {"neuron": selection.neurons, "head": selection.heads, "kv_group": selection.kv_heads}
    carried = {}
    for key, value in scores.scores.items():
        axis = key.split(".", 1)[1]
        if axis == "layer":
            value = value[layers]
        elif axis == "hidden":
            value = value if selection.hidden is None else value[selection.hidden]
        elif units[axis] is None:
            value = value[layers]
        else:
            value = torch.stack([value[layer][units[axis][layer]] for layer in selection.kept_layers])
        carried[key] = value.clone()
    return ImportanceScores(carried, {**scores.meta, "fingerprint": fingerprint, "carried_from": scores.meta.get(
        "fingerprint")})


def scores_digest(scores) -> str:
    """A short hash of every score tensor (which units a cut keeps depends on nothing else)."""
    digest = hashlib.sha256()
    for key in sorted(scores.scores):
        digest.update(key.encode())
        digest.update(scores.scores[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_digest(folder: str) -> str:
    """A short hash of a checkpoint's weight files (the next step's record names its source by it)."""
    names = sorted(name for name in os.listdir(folder)
                   if name.endswith(".safetensors") or name in ("model.safetensors.index.json", "pytorch_model.bin"))
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(outputs.file_digest(os.path.join(folder, name)).encode())
    return digest.hexdigest()[:16]


def identity_layer_map(num_layers: int) -> dict[int, int]:
    """The teacher's own layer map (hidden-state indices 1..L onto themselves)."""
    return {layer: layer for layer in range(1, num_layers + 1)}


# ----------------------------------------------------------------------- run
def gradual_prune(teacher, tokenizer, train, out, *, target, schedule: ScheduleOptions | None = None, search=None,
                  distill=None, importance=None, evaluation=None, reconstruct=None, heldout: dict | None = None,
                  scores=None, reconstruction=None, distill_teacher=None, teacher_cache: str | None = None,
                  synthetic_texts=None, synthetic_caches: dict | None = None, mix_fraction: float = 0.0, seed: int = 0,
                  training_args=(),
                  save_dtype="auto", replace_stale: bool = False, teacher_fingerprint: str | None = None,
                  progress: bool = True, log=print) -> dict:
    """Prune ``teacher`` (never modified) to ``target`` (``slimlm.search.Budget``'s fields with
    ``target_params``) in the steps of ``schedule`` (``ScheduleOptions``; default two steps),
    distilling after each cut (module docstring), into ``out``; returns the run's record
    (``gradual.json``: the plan, each finished step's record, ``final``: the last student's folder
    relative to ``out``).

    ``train``: token shards or texts; ``search`` (``SearchOptions``), ``distill``
    (``DistillOptions``: ``max_tokens`` is the whole schedule's, split between the steps),
    ``importance`` (``ImportanceOptions``), ``evaluation`` (``EvalOptions``: the held-out blocks
    measured after each cut and step) and ``reconstruct`` (``ReconstructOptions`` or None) say how
    each step scores, searches, distills and cuts. ``heldout``: {split name: token shards or
    texts} measured per step. ``scores``/``reconstruction``: the teacher's, when the caller has
    them (else computed in step 1's work folder). ``distill_teacher``: what each step distills
    from (a corrected teacher; default ``teacher``), or ``teacher_cache`` (a top-k cache folder)
    instead. ``synthetic_texts`` (texts, or {source: texts}) or ``synthetic_caches`` ({source:
    top-k cache of teacher-written text}) mix into every step's distillation by ``mix_fraction``,
    as ``distill_stage`` mixes them. ``save_dtype``: the final student's (auto: the teacher's source dtype); the
    intermediate students are saved in the dtype they trained in. A record in ``out`` of other
    inputs is refused (InputError) unless ``replace_stale``, which deletes it."""
    return _GradualRun(teacher, tokenizer, train, out, target=target, schedule=schedule, search=search,
                       distill=distill, importance=importance, evaluation=evaluation, reconstruct=reconstruct,
                       heldout=heldout, scores=scores, reconstruction=reconstruction, distill_teacher=distill_teacher,
                       teacher_cache=teacher_cache, synthetic_texts=synthetic_texts,
                       synthetic_caches=synthetic_caches, mix_fraction=mix_fraction,
                       seed=seed, training_args=training_args, save_dtype=save_dtype,
                       teacher_fingerprint=teacher_fingerprint, progress=progress, log=log).run(replace_stale)


class _GradualRun:
    """One schedule's run: the settings, the plan and the steps (``gradual_prune``)."""

    def __init__(self, teacher, tokenizer, train, out, *, target, schedule, search, distill, importance, evaluation,
                 reconstruct, heldout, scores, reconstruction, distill_teacher, teacher_cache, synthetic_texts,
                 synthetic_caches, mix_fraction, seed, training_args, save_dtype, teacher_fingerprint, progress, log):
        from slimlm.distill.options import DistillOptions
        from slimlm.evaluate import EvalOptions
        from slimlm.fingerprint import model_fingerprint
        from slimlm.importance.options import ImportanceOptions
        from slimlm.models import save_dtype as resolve_save_dtype
        from slimlm.pipeline.correct import CORRECTION_ATTRIBUTE
        from slimlm.pipeline.search import held_out
        from slimlm.search import SearchOptions

        self.teacher, self.tokenizer, self.train, self.out = teacher, tokenizer, train, os.fspath(out)
        self.schedule = schedule or ScheduleOptions()
        self.search = search or SearchOptions()
        self.distill = distill or DistillOptions()
        self.importance = importance or ImportanceOptions()
        self.evaluation = evaluation or EvalOptions()
        self.reconstruct, self.scores, self.reconstruction = reconstruct, scores, reconstruction
        self.distill_teacher = None if teacher_cache is not None else (distill_teacher or teacher)
        self.teacher_cache, self.seed, self.training_args = teacher_cache, seed, list(training_args)
        mixed = bool(synthetic_texts or synthetic_caches) and mix_fraction > 0
        self.synthetic_texts, self.synthetic_caches = synthetic_texts, synthetic_caches
        self.mix_fraction = mix_fraction if mixed else 0.0
        self.progress, self.log = progress, log
        parameter = next(teacher.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.save_dtype = str(resolve_save_dtype(teacher, save_dtype)).removeprefix("torch.")
        self.teacher_fp = teacher_fingerprint or model_fingerprint(teacher)

        self.search_blocks = sample_blocks(train, tokenizer, self.search.num_blocks, self.search.seq_len, seed,
                                           model=teacher)
        try:
            search_train, _ = self.search_blocks.split(held_out(self.search.held_out), seed)
        except ValueError as error:
            raise InputError(f"search: {len(self.search_blocks)} calibration block(s) of {self.search.seq_len} "
                             f"tokens are too few for held_out={self.search.held_out} ({error})") from None
        self.plan = schedule_plan(teacher, target, self.schedule, self.search, self.distill.max_tokens,
                                  train_blocks=len(search_train))
        self.heldout = {name: eval_blocks(data, tokenizer, self.evaluation.seq_len, self.evaluation.max_blocks,
                                          model=teacher) for name, data in (heldout or {}).items()}
        self.heldout_data = heldout or {}
        self.eval_key = read_json_roundtrip({
            "seq_len": self.evaluation.seq_len, "max_blocks": self.evaluation.max_blocks,
            "heldout": {name: data_digest(data) for name, data in self.heldout_data.items()}})
        correction = getattr(self.distill_teacher, CORRECTION_ATTRIBUTE, None)
        texts = [text for part in synthetic_texts.values() for text in part] if isinstance(synthetic_texts, dict) \
            else synthetic_texts
        self.inputs = read_json_roundtrip({
            "teacher": self.teacher_fp, "train": data_digest(train), "plan": self.plan.as_record(),
            "schedule": self.schedule.as_record(), "search": self.search.as_record(),
            "distill": {key: value for key, value in self.distill.as_record().items() if key not in UNRECORDED_DISTILL},
            "max_tokens": self.distill.max_tokens, "importance": self.importance.as_record(),
            "reconstruct": reconstruct.as_record() if reconstruct is not None else None,
            "scores": scores_digest(scores) if scores is not None else None,
            "distill_teacher": model_fingerprint(self.distill_teacher) if self.distill_teacher is not None else None,
            "teacher_correction": correction,
            "teacher_cache": outputs.file_digest(os.path.join(teacher_cache, "manifest.json"))
            if teacher_cache is not None else None,
            "synthetic": {"texts": texts_digest(texts) if texts else None,
                          "caches": {source: outputs.file_digest(os.path.join(path, "manifest.json"))
                                     for source, path in sorted((synthetic_caches or {}).items())}} if mixed else None,
            "mix": self.mix_fraction,
            "seed": seed, "training_args": self.training_args, "save_dtype": self.save_dtype})

    # ------------------------------------------------------------ the run
    def run(self, replace_stale: bool) -> dict:
        path = os.path.join(self.out, RECORD_FILE)
        previous = read_json(path)
        if previous is not None and inputs_stale_reason(previous, self.inputs, "") is not None:
            changed = inputs_stale_reason(previous, self.inputs, "")
            if not replace_stale:
                raise InputError(f"{self.out} holds a gradual run of other inputs ({changed.split('(', 1)[-1]}; pass "
                                 "--overwrite to replace it")
            self.log(f"[gradual] {self.out} holds a gradual run of other inputs: deleting its steps")
            outputs.remove(os.path.join(self.out, STEPS_DIR))
        os.makedirs(self.out, exist_ok=True)
        outputs.claim(self.out)
        self.clock = time.monotonic()  # the steps share distill.max_minutes from here (step_minutes)
        num_layers = self.teacher.config.num_hidden_layers
        source, layer_map, records = self.teacher_fp, identity_layer_map(num_layers), []
        self.write_record(records)
        for step in range(1, self.schedule.steps + 1):
            inputs = {**self.inputs, "step": step, "budget": self.plan.budgets[step - 1],
                      "tokens": self.plan.shares[step - 1], "source": source}
            record = self.finished(step, inputs)
            if record is None:
                record = self.run_step(step, inputs, layer_map)
            else:
                self.log(f"[gradual] step {step}: {os.path.relpath(step_dir(self.out, step), self.out)} is already "
                         f"done ({record['key']}, {record['params']:,} params): read back")
                if record["eval_key"] != self.eval_key:
                    record = self.evaluate_again(step, record)
            records.append(record)
            source, layer_map = record["student"], {int(k): v for k, v in record["layer_map"].items()}
            self.write_record(records)
        return read_json(path)

    def write_record(self, records: list[dict]) -> None:
        steps = [{key: value for key, value in record.items() if key != "inputs"} for record in records]
        done = len(records) == self.schedule.steps
        outputs.write_json(os.path.join(self.out, RECORD_FILE), {
            "inputs": self.inputs, **self.plan.as_record(), "schedule": self.schedule.as_record(), "steps": steps,
            "final": os.path.relpath(step_dir(self.out, self.schedule.steps), self.out) if done else None})

    def finished(self, step: int, inputs: dict) -> dict | None:
        """Step ``step``'s record when its student is there, made from ``inputs``; else None."""
        folder = step_dir(self.out, step)
        record = read_json(os.path.join(folder, STEP_RECORD))
        if record is None or not has_weights(folder) or inputs_stale_reason(record, inputs, "") is not None:
            return None
        return record if record.get("student") == weights_digest(folder) else None

    def run_step(self, step: int, inputs: dict, layer_map: dict[int, int]) -> dict:
        from slimlm.architectures import model_sizes
        from slimlm.fingerprint import model_fingerprint
        from slimlm.losses import depth_layer_map
        from slimlm.models import load_model
        from slimlm.pipeline.search import search_stage
        from slimlm.search.records import WINNER_DIR
        from slimlm.search.schedule import shape_of
        from slimlm.surgery.save import RECORD_FILE as PRUNE_RECORD

        last = step == self.schedule.steps
        budget, share = self.plan.budgets[step - 1], self.plan.shares[step - 1]
        work = work_dir(self.out, step)
        os.makedirs(work, exist_ok=True)
        self.log(f"[gradual] step {step} of {self.schedule.steps}: to {budget:,} parameters, {share:,} tokens")
        seconds, started = {}, time.perf_counter()
        if step == 1:
            source, source_fp = self.teacher, self.teacher_fp
        else:
            source = load_model(step_dir(self.out, step - 1), dtype=self.dtype, device=self.device)
            source_fp = model_fingerprint(source)
        before = model_sizes(source.config)
        scores = self.step_scores(step, source, source_fp)
        stats = self.step_reconstruction(step, source)
        seconds["scores"], started = time.perf_counter() - started, time.perf_counter()

        section = {**self.search.as_record(), "space": dataclasses.asdict(self.plan.space)}
        result = search_stage(source, scores, {"target_params": budget, "tolerance": self.plan.tolerance},
                              self.search_blocks, os.path.join(work, "search"), section=section,
                              distill=self.distill.as_record(), seed=self.seed, device=self.device.type,
                              reconstruct=stats, log=self.log)
        winner = result.winner
        check_not_grown(before, winner, step)
        seconds["search"], started = time.perf_counter() - started, time.perf_counter()

        pruned_dir = os.path.join(work, "pruned")
        pruned = self.cut(source if step > 1 else copy.deepcopy(source), source_fp, scores, result.target, stats,
                          pruned_dir, self.save_dtype if last else str(self.dtype).removeprefix("torch."))
        prune_record = read_json(os.path.join(pruned_dir, PRUNE_RECORD))
        layers = winner["num_layers"]
        composed = compose_layer_maps(layer_map, depth_layer_map(layers, before["num_layers"],
                                                                  prune_record["kept_layers"]))
        seconds["prune"], started = time.perf_counter() - started, time.perf_counter()

        rerank = self.plan.rerank or 0
        start = os.path.join(work, "search", WINNER_DIR) if rerank else pruned_dir
        self.distill_step(step, start, share - rerank, composed)
        seconds["distill"], started = time.perf_counter() - started, time.perf_counter()

        folder = step_dir(self.out, step)
        distilled = read_json(os.path.join(folder, DISTILL_RECORD))
        record = {
            "inputs": inputs, "eval_key": self.eval_key, "step": step, "budget": budget, "key": winner["key"],
            "shape": shape_of(winner), "params": winner["params"], "target": dataclasses.asdict(result.target),
            "tokens": {"share": share, "rerank": rerank, "distill": distilled["tokens_seen"],
                       "cumulative": self.cumulative_before(step) + rerank + distilled["tokens_seen"]},
            "teacher_layers": [composed[layer] - 1 for layer in range(1, layers + 1)],
            "layer_map": {str(k): v for k, v in composed.items()},
            "perplexity": {"cut": self.perplexities(pruned), "step": self.perplexities(self.load_step(step))},
            "scores": "teacher" if step == 1 else "rescored" if self.schedule.rescore else "carried",
            "student": weights_digest(folder)}
        seconds["eval"] = time.perf_counter() - started
        record["seconds"] = {name: round(value, 3) for name, value in seconds.items()}
        outputs.write_json(os.path.join(folder, STEP_RECORD), record)
        self.log(f"[gradual] step {step} done: {winner['key']} ({winner['params']:,} params), "
                 f"{record['tokens']['cumulative']:,} tokens so far"
                 + "".join(f", {name} ppl {value:.2f}" for name, value in record["perplexity"]["step"].items()))
        return record

    def cumulative_before(self, step: int) -> int:
        if step == 1:
            return 0
        return read_json(os.path.join(step_dir(self.out, step - 1), STEP_RECORD))["tokens"]["cumulative"]

    def load_step(self, step: int):
        from slimlm.models import load_model

        return load_model(step_dir(self.out, step), dtype=self.dtype, device=self.device)

    # --------------------------------------------------------- the pieces
    def teacher_scores(self):
        """The teacher's scores: given, else computed into step 1's work folder (read back when there)."""
        if self.scores is None:
            self.scores = self.measured_scores(1, self.teacher, self.teacher_fp)
        return self.scores

    def measured_scores(self, step: int, model, fingerprint: str):
        """``model``'s scores on its own activations, in step ``step``'s work folder (read back
        when they are there, made from the same inputs)."""
        from slimlm.pipeline.importance import importance_stage, load_scores, scores_stale_reason

        folder = os.path.join(work_dir(self.out, step), "scores")
        inputs = {"model": fingerprint, "train": self.inputs["train"], "settings": self.importance.as_record(),
                  "seed": self.seed}
        if scores_stale_reason(folder, model, inputs) is None:
            self.log(f"[gradual] step {step}: scores read back from {os.path.relpath(folder, self.out)}")
            return load_scores(folder)
        calibration = sample_blocks(self.train, self.tokenizer, self.importance.num_samples, self.importance.seq_len,
                                    self.seed, model=model)
        return importance_stage(model, calibration, folder, self.importance, seed=self.seed, progress=self.progress,
                                inputs=inputs, fingerprint=fingerprint)

    def step_scores(self, step: int, source, source_fp: str):
        """The scores step ``step`` cuts ``source`` by: the teacher's at step 1; later, the
        source's own (``rescore``) or the previous step's scores of the units the source kept
        (saved in the work folder, as the next step may carry them on)."""
        from slimlm.pipeline.importance import load_scores
        from slimlm.surgery.planning import PrunePlan
        from slimlm.surgery.save import RECORD_FILE as PRUNE_RECORD
        from slimlm.surgery.selection import select_units

        if step == 1:
            return self.teacher_scores()
        if self.schedule.rescore:
            return self.measured_scores(step, source, source_fp)
        previous_work = work_dir(self.out, step - 1)
        previous = self.teacher_scores() if step == 2 else load_scores(os.path.join(previous_work, "scores"))
        plan = PrunePlan(**read_json(os.path.join(previous_work, "pruned", PRUNE_RECORD))["plan"])
        selection = select_units(previous, plan.sizes_before, plan.sizes_after, plan.drop_layers, plan.depth_selection)
        scores = carried_scores(previous, selection, source_fp)
        scores.save(os.path.join(work_dir(self.out, step), "scores"))
        return scores

    def step_reconstruction(self, step: int, source):
        """``source``'s reconstruction statistics when the run refits the cut projections (None otherwise)."""
        if self.reconstruct is None:
            return None
        if step == 1 and self.reconstruction is not None:
            return self.reconstruction
        from slimlm.shards import token_blocks
        from slimlm.surgery.reconstruct import reconstruction_stats

        blocks = token_blocks(self.train, self.tokenizer, self.importance.seq_len, model=source)
        calibration = blocks.select(range(min(len(blocks), self.reconstruct.num_samples)))
        stats = reconstruction_stats(source, calibration, batch_size=self.importance.batch_size,
                                     num_samples=self.reconstruct.num_samples, ridge=self.reconstruct.ridge)
        if step == 1:
            self.reconstruction = stats
        return stats

    def cut(self, source, source_fp: str, scores, target, stats, folder: str, dtype: str):
        """``source`` cut to ``target`` and saved in ``folder`` (read back when it is there, made
        from the same inputs); returns the cut model."""
        from slimlm.models import load_model
        from slimlm.pipeline.prune import prune_stage, pruned_stale_reason

        inputs = {"source": source_fp, "target": dataclasses.asdict(target), "scores": scores_digest(scores),
                  "reconstruct": stats.record() if stats is not None else None, "save_dtype": dtype}
        if pruned_stale_reason(folder, source_fp, read_json_roundtrip(inputs)) is None:
            self.log(f"[gradual] {os.path.relpath(folder, self.out)} is already cut: read back")
            return load_model(folder, dtype=self.dtype, device=self.device)
        pruned, _ = prune_stage(source, scores, target, folder, tokenizer=self.tokenizer, overwrite=True,
                                inputs=inputs, save_dtype=dtype, reconstruct=stats)
        return pruned

    def step_minutes(self, step: int) -> float | None:
        """Step ``step``'s distillation minutes under ``distill.max_minutes`` (None without it): the
        steps share the minutes as they share the tokens, counted from the start of the run, so
        step k's distillation ends when the first k shares of the minutes have passed (its scoring,
        search and cut come out of its own share), and runs at least ``MIN_DISTILL_MINUTES``."""
        from slimlm.pipeline.distill import MIN_DISTILL_MINUTES

        if self.distill.max_minutes is None:
            return None
        share = sum(self.plan.shares[:step]) / sum(self.plan.shares)
        left = self.distill.max_minutes * share - (time.monotonic() - self.clock) / 60
        minutes = max(left, MIN_DISTILL_MINUTES)
        self.log(f"[gradual] step {step}: distilling for at most {minutes:.1f} min ({share:.0%} of "
                 f"distill.max_minutes {self.distill.max_minutes:g} by the end of this step)")
        return minutes

    def distill_step(self, step: int, start: str, tokens: int, layer_map: dict[int, int]) -> None:
        """Distill the student in ``start`` for ``tokens`` into step ``step``'s folder (read back
        when it holds this distillation; its checkpoints resumed as ``distill_stage`` resumes them)."""
        from slimlm.models import load_model, save_dtype

        last = step == self.schedule.steps
        options = dataclasses.replace(self.distill, max_tokens=tokens)
        student = load_model(start, dtype=torch.float32 if self.device.type == "cpu" else self.dtype)
        dtype = self.save_dtype if last else str(next(student.parameters()).dtype).removeprefix("torch.")
        settings = dict(synthetic_texts=self.synthetic_texts, synthetic_caches=self.synthetic_caches,
                        mix_fraction=self.mix_fraction, seed=self.seed + step - 1,
                        training_args=self.training_args,
                        layer_map=layer_map if self.distill.hidden_loss_weight > 0 else None,
                        teacher_cache=self.teacher_cache)
        folder = step_dir(self.out, step)
        inputs = distill_inputs(self.distill_teacher, student, self.train, options, **settings)
        if distilled_stale_reason(folder, with_save_dtype(inputs, save_dtype(student, dtype))) is None:
            self.log(f"[gradual] step {step}: {os.path.relpath(folder, self.out)} is already distilled")
            return
        self.log(f"[gradual] step {step}: distilling {tokens:,} tokens from {os.path.relpath(start, self.out)}")
        options = dataclasses.replace(options, max_minutes=self.step_minutes(step))
        distill_stage(self.distill_teacher, student, self.tokenizer, self.train, folder, options, overwrite=True,
                      clear_stale_checkpoints=True, checkpoints=os.path.join(work_dir(self.out, step), "checkpoints"),
                      disable_tqdm=not self.progress, extra_record={"gradual_step": step}, save_dtype=dtype,
                      eval_texts=self.heldout_data if self.distill.eval_steps else None, log=self.log, **settings)

    def perplexities(self, model) -> dict[str, float]:
        """Held-out perplexity of ``model`` per split."""
        from slimlm.evaluate import perplexity

        return {name: perplexity(model, blocks, batch_size=self.evaluation.batch_size, progress=False)["perplexity"]
                for name, blocks in self.heldout.items()}

    def evaluate_again(self, step: int, record: dict) -> dict:
        """A finished step's perplexities measured again for other held-out sets or settings."""
        from slimlm.models import load_model

        self.log(f"[gradual] step {step}: measuring the held-out perplexity again (other held-out sets or settings)")
        cut = load_model(os.path.join(work_dir(self.out, step), "pruned"), dtype=self.dtype, device=self.device)
        record = {**record, "eval_key": self.eval_key,
                  "perplexity": {"cut": self.perplexities(cut), "step": self.perplexities(self.load_step(step))}}
        outputs.write_json(os.path.join(step_dir(self.out, step), STEP_RECORD), record)
        return record


# -------------------------------------------------------------------- report
def _table(rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join("---" if i == 1 else "---:" for i in
                                                                range(len(rows[0]))) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows[1:]]


def gradual_report_lines(record: dict) -> list[str]:
    """The report's section on a gradual run (``gradual.json``, as ``gradual_prune`` returns it):
    a markdown table of each step (shape, parameters, budget, tokens, held-out perplexity per split
    after the cut and after the step) and the points of perplexity against cumulative
    distillation tokens (re-ranking tokens included) for the whole schedule."""
    steps = record["steps"]
    teacher = record["teacher_params"]
    splits = sorted({name for step in steps for name in step["perplexity"]["step"]},
                    key=lambda name: (name != "heldout", name))

    def ppl(values: dict, name: str) -> str:
        return f"{values[name]:.2f}" if name in values else "-"

    schedule = record["schedule"]
    scored = "scored on its own activations" if schedule["rescore"] else "cut by the teacher's scores of its units"
    lines = ["## Gradual pruning", "",
             f"{schedule['steps']} steps to {record['final_params']:,} parameters "
             f"({record['final_params'] / teacher:.1%} of the teacher's {teacher:,}); distillation tokens split "
             f"{_rule(schedule['token_split'])}, step budgets {_rule(schedule['step_budgets'])}; each intermediate "
             f"student {scored}.", ""]
    rows = [["step", "shape", "params", "budget", "re-rank tokens", "distill tokens", "cumulative tokens",
             *[f"{name} after the cut" for name in splits], *[f"{name} after the step" for name in splits]]]
    for step in steps:
        rows.append([str(step["step"]), step["key"], f"{step['params']:,} ({step['params'] / teacher:.1%})",
                     f"{step['budget']:,}", f"{step['tokens']['rerank']:,}", f"{step['tokens']['distill']:,}",
                     f"{step['tokens']['cumulative']:,}", *[ppl(step["perplexity"]["cut"], name) for name in splits],
                     *[ppl(step["perplexity"]["step"], name) for name in splits]])
    lines += _table(rows)
    if splits:
        lines += ["", "Held-out perplexity against cumulative distillation tokens (re-ranking tokens included):", ""]
        points = [["cumulative tokens", "point", *splits]]
        before = 0
        for step in steps:
            points.append([f"{before:,}", f"step {step['step']} cut",
                           *[ppl(step["perplexity"]["cut"], name) for name in splits]])
            before = step["tokens"]["cumulative"]
            points.append([f"{before:,}", f"after step {step['step']}",
                           *[ppl(step["perplexity"]["step"], name) for name in splits]])
        lines += _table(points)
    return lines


def _rule(value) -> str:
    items = [value] if isinstance(value, str) else list(value)
    return items[0] if len(items) == 1 and not _is_number(items[0]) else "as " + " / ".join(
        f"{float(item):g}" for item in items)


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------- stage
def _link_tree(source: str, destination: str) -> None:
    """``destination`` made a copy of the folder ``source`` (files hard-linked where the file
    system allows: the checkpoints are never changed in place), swapped in atomically."""
    def link(src, dst):
        try:
            if os.path.lexists(dst):
                os.remove(dst)
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with outputs.atomic_output(destination) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True, copy_function=link)


class GradualStage(Stage):
    """A recipe's ``schedule:``: the target reached in steps (``gradual_prune``, ``steps/`` and
    ``gradual.json``) instead of the search, prune and distill stages. The last step's cut and
    student are put where the later stages read the one-shot's (``pruned/``, ``distilled/``,
    ``plan.txt``), and the values of the stages it replaces are given to them (``done["search"]``
    None, ``done["prune"]`` each step's plan, ``done["distill"]`` the steps' log histories one
    after the other). Its value is the run's record. Finished steps are read back, so it always runs."""

    name, output = "gradual", STEPS_DIR
    resumes_itself = True

    def wanted(self, ctx: RunContext) -> bool:
        return ctx.recipe.get("schedule") is not None

    def stale_reason(self, ctx: RunContext, inputs: dict | None) -> str | None:
        done = os.path.isfile(ctx.path(RECORD_FILE))
        return "resuming: finished steps are read back" if done else "missing"

    def run(self, ctx: RunContext, done: dict, inputs: dict | None) -> dict:
        from slimlm.distill.options import DistillOptions
        from slimlm.evaluate import EvalOptions
        from slimlm.importance.options import ImportanceOptions
        from slimlm.pipeline.recipe import general_sets
        from slimlm.search import SearchOptions
        from slimlm.surgery.options import ReconstructOptions

        from slimlm.pipeline.distill import distill_minutes

        recipe = ctx.recipe
        train = done["tokenize"]["train"]
        synthetic = done.get("synthetic")
        # the whole schedule ends by distill.finish_by_minutes of the run; its steps share the minutes
        distill = dataclasses.replace(DistillOptions(**recipe["distill"]),
                                      max_minutes=distill_minutes(recipe["distill"], ctx.started, ctx.log))
        # Teacher-written text as the distill stage takes it: its cached targets, else its texts by source.
        caches = synthetic.caches if synthetic is not None and synthetic.caches else None
        texts = synthetic.texts_by_source() if synthetic is not None and not caches else None
        record = gradual_prune(
            ctx.teacher, ctx.tokenizer, train, ctx.out, target=recipe["target"],
            schedule=ScheduleOptions(**recipe["schedule"]), search=SearchOptions(**recipe["search"]),
            distill=distill, importance=ImportanceOptions(**recipe["importance"]),
            evaluation=EvalOptions(**recipe["eval"]),
            reconstruct=ReconstructOptions(**recipe["reconstruct"]) if recipe["reconstruct"] is not None else None,
            heldout={name: done["tokenize"][name] for name in ("heldout", *general_sets(recipe))},
            scores=done["importance"], reconstruction=ctx.reconstruction(train),
            distill_teacher=done.get("correct_teacher", ctx.teacher), teacher_cache=done.get("teacher_cache"),
            synthetic_texts=texts, synthetic_caches=caches,
            mix_fraction=recipe["synthetic"]["mix"] if synthetic is not None else 0.0,
            seed=recipe["seed"], training_args=ctx.training_flags(), save_dtype=recipe["save_dtype"],
            replace_stale=True, teacher_fingerprint=ctx.teacher_fp, progress=ctx.progress, log=ctx.log)
        self.publish(ctx, done, record)
        return record

    @staticmethod
    def publish(ctx: RunContext, done: dict, record: dict) -> None:
        from slimlm.pipeline.prune import PLAN_FILE
        from slimlm.surgery.planning import PrunePlan
        from slimlm.surgery.save import RECORD_FILE as PRUNE_RECORD

        steps = len(record["steps"])
        _link_tree(os.path.join(work_dir(ctx.out, steps), "pruned"), ctx.path("pruned"))
        _link_tree(step_dir(ctx.out, steps), ctx.path("distilled"))
        plans, history, offset = [], [], 0
        for step in range(1, steps + 1):
            pruned = read_json(os.path.join(work_dir(ctx.out, step), "pruned", PRUNE_RECORD))
            plans.append(f"step {step}:\n{PrunePlan(**pruned['plan']).table()}")
            entries = read_json(os.path.join(step_dir(ctx.out, step), DISTILL_RECORD))["log_history"]
            history += [{**entry, "step": entry["step"] + offset} if "step" in entry else entry for entry in entries]
            offset += max((entry.get("step", 0) for entry in entries), default=0)
        outputs.write_text(ctx.path(PLAN_FILE), "\n\n".join(plans) + "\n")
        done.update(search=None, prune="\n\n".join(plans), distill=history)
