"""The distill stage: train the pruned student on the teacher's outputs with the Hugging Face
Trainer, checkpointing as it goes, and swap the finished student into its output folder."""
from __future__ import annotations

import dataclasses
import math
import os

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.checkpoints import plan_checkpoints
from slimlm.pipeline.records import DISTILL_RECORD, RUN_RECORD, has_weights, inputs_stale_reason, read_json, \
    read_json_roundtrip, texts_digest


def distill_inputs(teacher, student, train_texts, *, synthetic_texts=None, mix_fraction=0.0, seq_len=256,
                   max_tokens=None, batch_size=8, learning_rate=1e-4, temperature=1.0, beta=0.0, kd_weight=1.0,
                   ce_weight=0.0, seed=0, training_args=(), teacher_precision="auto", student_precision="auto",
                   fit_to_time=False, distillation_options=None) -> dict:
    """Everything a distillation run depends on: the models' fingerprints, the data's digests,
    the training arguments and the teacher's and student's precision options (as asked: "auto"
    resolves per machine). A checkpoint folder is resumed only by a run with the same. A teacher from
    ``slimlm.pipeline.correct.correct_teacher_stage`` adds its correction's inputs
    ("teacher_correction"): its weights' fingerprint alone may miss the fine-tuning."""
    from slimlm.distill.teacher import check_teacher_precision
    from slimlm.distill.training import check_student_precision
    from slimlm.fingerprint import model_fingerprint
    from slimlm.pipeline.correct import CORRECTION_ATTRIBUTE

    mixed = bool(synthetic_texts) and mix_fraction > 0
    correction = getattr(teacher, CORRECTION_ATTRIBUTE, None)
    return read_json_roundtrip({
        **({"teacher_correction": correction} if correction is not None else {}),
        "teacher": model_fingerprint(teacher), "student": model_fingerprint(student),
        "train": texts_digest(train_texts), "synthetic": texts_digest(synthetic_texts) if mixed else None,
        "mix": mix_fraction if mixed else 0.0, "seq_len": seq_len, "max_tokens": max_tokens,
        "batch_size": batch_size, "learning_rate": learning_rate, "temperature": temperature, "beta": beta,
        "kd_weight": kd_weight, "ce_weight": ce_weight, "seed": seed, "training_args": list(training_args),
        "teacher_precision": check_teacher_precision(teacher_precision),
        "student_precision": check_student_precision(student_precision),
        "fit_to_time": bool(fit_to_time),
        **({"distillation_options": distillation_options} if distillation_options else {})})


def pruned_layer_map(student_dir: str, student, teacher) -> dict[int, int] | None:
    """The hidden-state loss's layer map for a student pruned from ``teacher`` by slimlm: student
    layer i onto the teacher layer it was cut from (``kept_layers`` of ``slimlm_prune.json`` in
    ``student_dir``), so each student layer is compared with its own origin rather than with
    layers spread evenly (the trainer's default). None when the folder holds no such record (or
    one of a model pruned twice, or not matching the two models' depths)."""
    from slimlm.losses import depth_layer_map
    from slimlm.surgery.save import RECORD_FILE

    record = read_json(os.path.join(student_dir, RECORD_FILE)) or {}
    kept = record.get("kept_layers")
    if not kept or record.get("previous") is not None:
        return None
    try:
        return depth_layer_map(student.config.num_hidden_layers, teacher.config.num_hidden_layers, kept)
    except ValueError:
        return None


def check_distill_settings(*, learning_rate, temperature, beta, kd_weight, ce_weight, max_minutes=None,
                           mix_fraction=0.0, fit_to_time=False) -> None:
    """InputError for a setting no run can use, before anything is loaded or written."""
    if fit_to_time and not max_minutes:
        raise InputError("--fit-to-time fits the schedule to --max-minutes: give --max-minutes too")
    checks = [("lr", learning_rate, learning_rate > 0, "> 0"), ("temperature", temperature, temperature > 0, "> 0"),
              ("beta", beta, 0 <= beta <= 1, "in [0, 1]"), ("kd-weight", kd_weight, kd_weight >= 0, ">= 0"),
              ("ce-weight", ce_weight, ce_weight >= 0, ">= 0"),
              ("mix", mix_fraction, 0 <= mix_fraction <= 1, "in [0, 1]"),
              ("max-minutes", max_minutes, max_minutes is None or max_minutes > 0, "> 0")]
    for name, value, ok, rule in checks:
        if not ok or isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"--{name} must be {rule} and finite, got {value}")
    if kd_weight == 0 and ce_weight == 0:
        raise InputError("--kd-weight and --ce-weight are both 0: nothing to train on")


def distill_stage(teacher, student, tokenizer, train_texts, out: str, *, synthetic_texts=None, mix_fraction=0.0,
                  seq_len=256, max_tokens=None, batch_size=8, learning_rate=1e-4, temperature=1.0, beta=0.0,
                  kd_weight=1.0, ce_weight=0.0, seed=0, training_args=(), resume=True, overwrite=False,
                  clear_stale_checkpoints=False, checkpoints: str | None = None, max_minutes: float | None = None,
                  disable_tqdm: bool = False, extra_record=None, save_dtype=None, teacher_precision="auto",
                  student_precision="auto", fit_to_time=False, distillation_options=None, eval_texts: dict | None = None, eval_steps: int | None = None,
                  eval_blocks: int = 8,
                  log=print):
    """Distill ``teacher`` into ``student`` on blocks of ``train_texts`` (and, with
    ``mix_fraction`` > 0, packed ``synthetic_texts``), then save the student to ``out`` atomically.

    ``max_tokens`` sets ``max_steps`` = ⌈max_tokens / (batch · accumulation · world · seq_len)⌉
    unless ``training_args`` names ``--max_steps``. ``training_args``: command-line style
    ``TrainingArguments`` flags (``["--warmup_steps", "0.1"]``), which win over these defaults.
    ``max_minutes`` stops training early (a safety cap on a loaded machine; the schedule
    still follows ``max_steps``, and a rerun may change it and still resume). With
    ``fit_to_time`` the schedule is fitted to ``max_minutes`` instead
    (``slimlm.distill.training.fit_schedule_callback``): after the first steps the run plans the
    steps that fit at the measured speed (at most ``max_steps``), and its warmup and decay end
    there; the plan is kept in the checkpoints, so a resumed run continues it.

    Checkpoints go to ``checkpoints`` (default ``<out>.checkpoints``), which records the run's
    ``distill_inputs``. With ``resume``, the newest complete checkpoint of this same run is
    continued (incomplete ones, left by a kill, are deleted); a folder of another run is
    refused unless ``clear_stale_checkpoints``, which deletes it. ``resume=False`` starts
    over. Returns (student, log_history).

    ``teacher_precision`` ("auto" | "fp32" | "bf16" | "int8", ``slimlm.distill.teacher``): what the
    teacher's forward runs in; "auto" (default) is bf16 for a float32 teacher on a CPU with native
    bf16 (held-out KL from the float32 teacher ~0.001 nats/token on SmolLM2), else the teacher as
    given. The teacher's LM head in the loss stays as loaded. ``student_precision`` ("auto" |
    "fp32" | "bf16", ``slimlm.distill.training.student_precision_flags``): "auto" (default) trains
    the student in bf16 mixed precision (float32 master weights) where bf16 is native, else in
    float32; a ``--bf16``/``--fp16`` flag in ``training_args`` wins.

    ``out`` holds the student in ``save_dtype`` ("float32" | "bfloat16" | "float16"; None/"auto":
    the dtype ``student``'s source checkpoint declares, ``slimlm.models.save_dtype``), whatever
    dtype it trained in; the checkpoints stay in the training dtype, so a resumed run continues
    exactly. Its record's ``inputs`` are ``distill_inputs`` plus ``save_dtype`` (the dtype's name),
    which ``distilled_stale_reason`` compares.

    ``eval_texts`` ({name: texts}) with ``eval_steps``: every that many steps (and after the
    last) the student's NLL/perplexity on the first ``eval_blocks`` blocks of each is logged
    (``<name>_nll``, ``<name>_ppl``) into the log history, beside the losses.
    ``distillation_options``: more ``DistillationConfig`` fields, e.g. the hidden-state loss
    (``{"hidden_loss_weight": 1.0, "hidden_loss_schedule": "minitron", "layer_map": {...}}``);
    default none. The fields this function takes as parameters are refused there.
    """
    from transformers import set_seed

    from slimlm.data import tokenize_blocks
    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
    from slimlm.distill.training import fit_schedule_callback, heldout_eval_callback, student_precision_flags, \
        time_budget_callback, tokens_per_step, training_arguments, training_items, training_set
    from slimlm.fingerprint import model_fingerprint
    from slimlm.models import save_dtype as resolve_save_dtype

    check_distill_settings(learning_rate=learning_rate, temperature=temperature, beta=beta, kd_weight=kd_weight,
                           ce_weight=ce_weight, max_minutes=max_minutes, mix_fraction=mix_fraction,
                           fit_to_time=fit_to_time)
    options = dict(distillation_options or {})
    own = {"kd_weight", "ce_weight", "temperature", "beta", "teacher_precision"} & set(options)
    if own:
        raise ValueError(f"distillation_options: {', '.join(sorted(own))} are distill_stage parameters; pass them as such")
    unknown = set(options) - {field.name for field in dataclasses.fields(DistillationConfig)}
    if unknown:
        raise ValueError(f"distillation_options: {', '.join(sorted(unknown))} are not DistillationConfig fields")
    config = DistillationConfig(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, beta=beta,
                                teacher_precision=teacher_precision, **options)
    config.check()
    out = outputs.check_output(out, overwrite)
    checkpoints = checkpoints or out + ".checkpoints"
    student_before = model_fingerprint(student)
    inputs = distill_inputs(teacher, student, train_texts, synthetic_texts=synthetic_texts, mix_fraction=mix_fraction,
                            seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                            learning_rate=learning_rate, temperature=temperature, beta=beta, kd_weight=kd_weight,
                            ce_weight=ce_weight, seed=seed, training_args=training_args,
                            teacher_precision=teacher_precision, student_precision=student_precision,
                            fit_to_time=fit_to_time, distillation_options=options)
    saved_dtype = resolve_save_dtype(student, save_dtype)
    args = training_arguments(student_precision_flags(student_precision, training_args, log=log), output_dir=checkpoints, batch_size=batch_size,
                              learning_rate=learning_rate, seed=seed)
    args.disable_tqdm = args.disable_tqdm or disable_tqdm
    # An explicit --resume_from_checkpoint is the user's choice: the folder is left as it is.
    decision = {"clear": False, "resume": None, "incomplete": []} if args.resume_from_checkpoint else \
        plan_checkpoints(checkpoints, inputs, resume=resume, clear_stale=clear_stale_checkpoints)
    set_seed(seed)

    def items(texts):
        return training_items(tokenize_blocks(texts, tokenizer, seq_len, model=student))

    mixed = bool(synthetic_texts) and mix_fraction > 0
    dataset = training_set(items(train_texts), items(synthetic_texts) if mixed else None, mix_fraction, seed=seed)
    explicit_steps = any(flag.split("=")[0] == "--max_steps" for flag in training_args)
    if max_tokens is not None and not explicit_steps:
        args.max_steps = max(1, math.ceil(max_tokens / tokens_per_step(args, seq_len)))

    callbacks = [time_budget_callback(max_minutes * 60)] if max_minutes else []
    if fit_to_time:  # before the evaluation callback, which evaluates at the (fitted) last step
        callbacks.insert(0, fit_schedule_callback(max_minutes * 60, log=log))
    if eval_texts and eval_steps:
        sets = {}
        for name, texts in eval_texts.items():
            blocks = tokenize_blocks(texts, tokenizer, seq_len, model=student)
            sets[name] = blocks.select(range(min(len(blocks), eval_blocks)))
        callbacks.append(heldout_eval_callback(sets, eval_steps, batch_size=batch_size, log=log))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  distillation_config=config, callbacks=callbacks or None)
    _prepare_checkpoints(trainer, checkpoints, decision, inputs, resume=resume, log=log)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or decision["resume"])
    if trainer.state.global_step == 0:
        raise RuntimeError(f"the distillation trained 0 steps ({len(dataset)} training items, max_steps "
                           f"{args.max_steps}); {out} is left as it was")

    record = {"teacher_fingerprint": model_fingerprint(teacher), "student_fingerprint_before": student_before,
              "inputs": with_save_dtype(inputs, saved_dtype), "train_texts": texts_digest(train_texts), "num_train_items": len(dataset),
              "max_steps": args.max_steps, "seq_len": seq_len, "learning_rate": args.learning_rate,
              "distillation": vars(config), "precision_used": precision_used(trainer), **(extra_record or {})}
    _save_student(trainer, tokenizer, out, record, seq_len, saved_dtype)
    return trainer.model, trainer.state.log_history


def precision_used(trainer) -> dict:
    """What "auto" resolved to here: the teacher's forward dtype, the student's mixed precision."""
    teacher = getattr(trainer, "teacher", None)
    if teacher is None:  # a top-k cache: no live teacher
        name = None
    elif any("quantized" in type(module).__module__ for module in teacher.modules()):
        name = "int8"
    else:
        name = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    return {"teacher": name,
            "student": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32"}


def _prepare_checkpoints(trainer, checkpoints: str, decision: dict, inputs: dict, *, resume: bool, log) -> None:
    """Carry out ``plan_checkpoints``' decision and record this run in the folder. Every rank
    decided the same from the folder as it was; once all have, rank 0 alone changes it."""
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        if decision["clear"]:
            log(f"[distill] deleting the checkpoints in {checkpoints}: "
                f"{'--overwrite' if not resume else 'they belong to a run of other inputs'}")
            outputs.remove(checkpoints)
        for path in decision["incomplete"]:
            log(f"[distill] skipping the incomplete {os.path.basename(path)} (an interrupted save); deleting it")
            outputs.remove(path)
        if decision["resume"]:
            log(f"[distill] resuming from {decision['resume']}")
        os.makedirs(checkpoints, exist_ok=True)
        outputs.write_json(os.path.join(checkpoints, RUN_RECORD), {"inputs": inputs})
    trainer.accelerator.wait_for_everyone()


def with_save_dtype(inputs: dict, dtype) -> dict:
    """A distilled output's inputs: the run's ``distill_inputs`` and the dtype it is saved in."""
    from slimlm.models import dtype_named

    return {**inputs, "save_dtype": str(dtype_named(dtype)).removeprefix("torch.")}


def _save_student(trainer, tokenizer, out: str, record: dict, seq_len: int, dtype) -> None:
    """Every rank takes part in saving (FSDP/DeepSpeed gather the weights); rank 0 writes, into a
    staging folder swapped into place, so ``out`` never holds half a checkpoint; the weights are
    then cast to ``dtype`` there. ``record`` (what the run was made from) is completed with what
    the training did."""
    from transformers.trainer import TRAINING_ARGS_NAME

    from slimlm.distill.trainer import PROJECTIONS_FILE
    from slimlm.distill.training import tokens_per_step
    from slimlm.models import cast_checkpoint, save_tokenizer

    main_process = trainer.is_world_process_zero()
    staging = outputs.staging_path(out)
    if main_process:
        outputs.prepare(out)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if main_process:
        # The hidden loss's learned projections and the Trainer's pickled arguments are training
        # artefacts (kept in the checkpoints for a resume; the record holds the arguments), not
        # part of the model: the student folder is a plain HF checkpoint, its weights its own.
        for artefact in (PROJECTIONS_FILE, TRAINING_ARGS_NAME):
            outputs.remove(os.path.join(staging, artefact))
        cast_checkpoint(staging, dtype)
        save_tokenizer(tokenizer, staging)
        state = trainer.state
        done = {"steps": state.global_step, "scheduled_steps": state.max_steps,
                "tokens_seen": int(state.global_step * tokens_per_step(trainer.args, seq_len)),
                "train_seconds": next((entry["train_runtime"] for entry in reversed(state.log_history)
                                       if "train_runtime" in entry), None),
                "log_history": state.log_history}
        outputs.write_json(os.path.join(staging, DISTILL_RECORD), {**record, **done})
        outputs.commit(staging, out)
    trainer.accelerator.wait_for_everyone()


def distilled_stale_reason(out: str, inputs: dict) -> str | None:
    """None when ``out`` holds a student distilled from ``inputs`` (``distill_inputs`` with the
    saved dtype, ``with_save_dtype``)."""
    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, DISTILL_RECORD))
    if record is None:
        return f"no {DISTILL_RECORD}"
    return inputs_stale_reason(record, inputs, "")

