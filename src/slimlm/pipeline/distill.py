"""The distill stage: train the pruned student on the teacher's outputs with the Hugging Face
Trainer, checkpointing as it goes, and swap the finished student into its output folder."""
from __future__ import annotations

import math
import os

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.pipeline.checkpoints import plan_checkpoints
from slimlm.pipeline.stage import RunContext, Stage
from slimlm.pipeline.recipe import general_sets
from slimlm.pipeline.records import DISTILL_RECORD, RUN_RECORD, data_digest, has_weights, inputs_stale_reason, \
    read_json, read_json_roundtrip, texts_digest


def distill_inputs(teacher, student, train, options=None, *, synthetic_texts=None, mix_fraction=0.0, seed=0,
                   training_args=(), layer_map=None, teacher_cache=None, synthetic_caches=None) -> dict:
    """Everything a distillation run depends on: the models' fingerprints, the data's digests,
    the options that shape the result (``DistillOptions``; not the time caps nor the evaluation
    along the way), the training arguments and the precisions as asked ("auto" resolves per
    machine). A checkpoint folder is resumed only by a run with the same. A teacher from
    ``slimlm.pipeline.correct.correct_teacher_stage`` adds its correction's inputs
    ("teacher_correction"): its weights' fingerprint alone may miss the fine-tuning. ``train``:
    token shards or texts (``data_digest``); ``teacher_cache``: a top-k cache folder the student
    learns from instead of ``teacher`` (None then), recorded by its manifest's digest; so are the
    ``synthetic_caches`` of teacher-written text."""
    from slimlm.distill.options import DistillOptions
    from slimlm.fingerprint import model_fingerprint
    from slimlm.pipeline.correct import CORRECTION_ATTRIBUTE

    options = options if options is not None else DistillOptions()
    mixed = bool(synthetic_texts or synthetic_caches) and mix_fraction > 0
    texts = [text for part in synthetic_texts.values() for text in part] if isinstance(synthetic_texts, dict) \
        else synthetic_texts
    correction = getattr(teacher, CORRECTION_ATTRIBUTE, None)
    extra = options.distillation_options()
    if layer_map is not None:
        extra["layer_map"] = layer_map
    return read_json_roundtrip({
        **({"teacher_correction": correction} if correction is not None else {}),
        "teacher": model_fingerprint(teacher) if teacher is not None else None,
        "student": model_fingerprint(student), "train": data_digest(train),
        **({"teacher_cache": outputs.file_digest(os.path.join(teacher_cache, "manifest.json"))}
           if teacher_cache is not None else {}),
        **({"synthetic_caches": {source: outputs.file_digest(os.path.join(path, "manifest.json"))
                                 for source, path in sorted(synthetic_caches.items())}} if synthetic_caches and mixed
           else {}),
        **({"dynamic_mix": {name: getattr(options, name) for name in MIX_FIELDS}} if options.dynamic_mix else {}),
        **({"corpus_sources": options.corpus_weights or "by tokens"} if options.corpus_sources else {}),
        # teacher-written texts: their share is of the items the run reads (older runs: of the corpus)
        **({"mix_share": "items read"} if mixed and texts and not synthetic_caches else {}),
        "synthetic": texts_digest(texts) if mixed and texts else None,
        "mix": mix_fraction if mixed else 0.0, "seq_len": options.seq_len, "max_tokens": options.max_tokens,
        "batch_size": options.batch_size, "learning_rate": options.lr, "temperature": options.temperature,
        "beta": options.beta, "kd_weight": options.kd_weight, "ce_weight": options.ce_weight, "seed": seed,
        "training_args": list(training_args), "teacher_precision": options.teacher_precision,
        "student_precision": options.student_precision, "fit_to_time": options.fit_to_time,
        **({"distillation_options": extra} if extra else {})})


MIX_FIELDS = ("mix_every", "mix_heldout_blocks", "mix_step_size", "mix_smoothing")


def source_mixture(classic, synthetic: dict, mix_fraction: float, options, *, num_items: int, seed: int,
                   teacher=None, log=print):
    """The training set of a mix of sources — the corpus (``classic``: its blocks as one source
    "corpus", or {name: blocks} as sources "corpus/<name>", ``slimlm.distill.mixture.corpus_sources``)
    and each ``synthetic`` source ({name: blocks}) — drawn batch by batch
    (``slimlm.distill.mixture.SourceMixture``: every batch from one source, so cached-target
    blocks and live-teacher blocks never share one). The synthetic sources share ``mix_fraction``
    of the weight by their sizes; the corpus's sources the rest, by their sizes or as
    ``options.corpus_weights`` says. With ``options.dynamic_mix`` the last ``mix_heldout_blocks``
    blocks of each source are held out and the weights follow the student's excess loss over
    ``teacher``'s on them (``dynamic_mix_callback``). Returns (dataset, callbacks)."""
    from torch.utils.data import Subset

    from slimlm.distill.mixture import SourceMixture, dynamic_mix_callback, reference_losses
    from slimlm.distill.options import corpus_weights_of

    corpus = {f"corpus/{name}": blocks for name, blocks in classic.items()} if isinstance(classic, dict) \
        else {"corpus": classic}
    given = corpus_weights_of(options.corpus_weights, [name.removeprefix("corpus/") for name in corpus],
                              "corpus_weights") if options.corpus_weights else None
    sources = {**corpus, **synthetic} if mix_fraction < 1 else dict(synthetic)
    heldout = {}
    if options.dynamic_mix:
        if teacher is None:
            raise InputError("the dynamic mix compares the student's loss with the live teacher's: it needs the "
                             "teacher (not a teacher cache alone)")
        count = options.mix_heldout_blocks
        for name, blocks in list(sources.items()):
            if len(blocks) <= count:
                raise InputError(f"the dynamic mix holds out {count} blocks of each source, but source {name!r} has "
                                 f"{len(blocks)}: lower distill.mix_heldout_blocks or give it more text")
            heldout[name] = [blocks[index] for index in range(len(blocks) - count, len(blocks))]
            sources[name] = Subset(blocks, range(len(blocks) - count))
    synthetic_size = sum(len(sources[name]) for name in synthetic)
    corpus_share = {name: given[name.removeprefix("corpus/")] if given is not None else len(sources[name])
                    for name in corpus if name in sources}
    corpus_total = sum(corpus_share.values())
    weights = {name: (1.0 - mix_fraction) * corpus_share[name] / corpus_total if name in corpus
               else mix_fraction * len(sources[name]) / synthetic_size for name in sources}
    mixture = SourceMixture(sources, weights, batch_size=options.batch_size, num_items=num_items, seed=seed)
    callbacks = []
    if options.dynamic_mix:
        reference = reference_losses(teacher, heldout, batch_size=options.batch_size)
        log(f"[distill] dynamic mix over {', '.join(sources)}: the teacher's held-out NLL "
            + ", ".join(f"{name} {value:.3f}" for name, value in reference.items()))
        callbacks.append(dynamic_mix_callback(mixture, heldout, reference, every=options.mix_every,
                                              batch_size=options.batch_size, step_size=options.mix_step_size,
                                              smoothing=options.mix_smoothing, log=log))
    return mixture, callbacks


def synthetic_blocks(synthetic_texts, synthetic_caches, tokenizer, options, *, student, log=print) -> dict:
    """{source name: blocks} of the teacher-written text: the packed blocks of each top-k cache
    (``PackedTopKBlocks``, checked against the student's vocabulary and the temperature; a cache
    shorter than one block is left out, with a line in the log), else of the texts (one source,
    or {source: texts})."""
    from slimlm.architectures import lm_head
    from slimlm.distill.items import training_items_of
    from slimlm.distill.topk_cache import PackedTopKBlocks, load_teacher_topk

    if synthetic_caches:
        blocks = {}
        for source, path in synthetic_caches.items():
            cache = load_teacher_topk(path)
            if cache.num_tokens < options.seq_len:
                log(f"[distill] synthetic text of {source!r} left out: {cache.num_tokens} tokens, fewer than one "
                    f"block of {options.seq_len}")
                continue
            packed = PackedTopKBlocks(cache, options.seq_len)
            try:
                packed.cache.check_compatible(vocab_size=lm_head(student).weight.shape[0],
                                              temperature=options.temperature)
            except ValueError as error:
                raise InputError(f"synthetic text of {source!r}: {error}") from None
            blocks[f"synthetic/{source}"] = packed
        return blocks
    if isinstance(synthetic_texts, dict):
        return {f"synthetic/{source}": training_items_of(texts, tokenizer, options.seq_len, model=student)
                for source, texts in synthetic_texts.items()}
    return {"synthetic": training_items_of(synthetic_texts, tokenizer, options.seq_len, model=student)}


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


def eval_blocks(data, tokenizer, seq_len: int, count: int, *, model=None):
    """The first ``count`` blocks of ``seq_len`` tokens of ``data`` (token shards or texts), as
    ``TokenBlocks``."""
    from slimlm.shards import token_blocks

    blocks = token_blocks(data, tokenizer, seq_len, model=model)
    return blocks.select(range(min(len(blocks), count)))


def distill_stage(teacher, student, tokenizer, train, out: str, options=None, *, synthetic_texts=None,
                  mix_fraction=0.0, seed=0, training_args=(), layer_map=None, teacher_cache=None,
                  synthetic_caches=None, resume=True,
                  overwrite=False,
                  clear_stale_checkpoints=False, checkpoints: str | None = None, disable_tqdm: bool = False,
                  extra_record=None, save_dtype=None, eval_texts: dict | None = None, log=print):
    """Distill ``teacher`` into ``student`` on blocks of ``train`` (token shards,
    ``slimlm.shards.TokenShards``, read from disk as the training goes; or a list of texts,
    tokenised in memory) and, with ``mix_fraction`` > 0, packed ``synthetic_texts``, then save the
    student to ``out`` atomically. With ``teacher_cache`` (a top-k cache of ``train``'s blocks,
    ``slimlm.distill.topk_cache``) the student learns from the cached teacher: no teacher is
    needed (``teacher`` may be None), the blocks are the cache's and synthetic text cannot mix in.
    ``synthetic_caches`` ({prompt source: top-k cache of its teacher-written text},
    ``slimlm.distill.generate.generate_synthetic``): the synthetic blocks learn from the cached
    targets, with no teacher pass; then, or with ``options.dynamic_mix``, the training set is a
    mix of sources drawn batch by batch (``source_mixture``), else classic and synthetic blocks
    are shuffled together (``training_set``).

    ``options`` (``slimlm.distill.options.DistillOptions``; default its defaults) says how:
    blocks of ``seq_len`` tokens, ``batch_size`` per device, peak ``lr``, the loss and the
    precisions. ``max_tokens`` sets ``max_steps`` = ⌈max_tokens / (batch · accumulation · world ·
    seq_len)⌉ unless ``training_args`` names ``--max_steps``. ``training_args``: command-line style
    ``TrainingArguments`` flags (``["--warmup_steps", "0.1"]``), which win over these defaults.
    ``max_minutes`` stops training early (a safety cap on a loaded machine; the schedule still
    follows ``max_steps``, and a rerun may change it and still resume). With ``fit_to_time`` the
    schedule is fitted to ``max_minutes`` instead (``slimlm.distill.training.fit_schedule_callback``):
    after the first steps the run plans the steps that fit at the measured speed (at most
    ``max_steps``), and its warmup and decay end there; the plan is kept in the checkpoints, so a
    resumed run continues it. ``layer_map``: the hidden-state loss's student → teacher layers
    (``pruned_layer_map``; default the trainer's even spread).

    Checkpoints go to ``checkpoints`` (default ``<out>.checkpoints``), which records the run's
    ``distill_inputs``. With ``resume``, the newest complete checkpoint of this same run is
    continued (incomplete ones, left by a kill, are deleted); a folder of another run is
    refused unless ``clear_stale_checkpoints``, which deletes it. ``resume=False`` starts
    over. Returns (student, log_history).

    ``teacher_precision``: what the teacher's forward runs in (``slimlm.distill.teacher``);
    "auto" is bfloat16 for a float32 teacher on a CPU with native bfloat16, else the teacher as
    given; its LM head in the loss stays as loaded. ``student_precision``
    (``slimlm.distill.training.student_precision_flags``): "auto" trains the student in bfloat16
    mixed precision (float32 master weights) where bfloat16 is native, else in float32; a
    ``--bf16``/``--fp16`` flag in ``training_args`` wins. The record's ``precision_used`` says
    what they resolved to.

    ``out`` holds the student in ``save_dtype`` ("float32" | "bfloat16" | "float16"; None/"auto":
    the dtype ``student``'s source checkpoint declares, ``slimlm.models.save_dtype``), whatever
    dtype it trained in; the checkpoints stay in the training dtype, so a resumed run continues
    exactly. Its record's ``inputs`` are ``distill_inputs`` plus ``save_dtype`` (the dtype's name),
    which ``distilled_stale_reason`` compares.

    ``eval_texts`` ({name: texts or token shards}) with ``eval_steps``: every that many steps (and
    after the last) the student's NLL/perplexity on the first ``eval_blocks`` blocks of each is logged
    (``<name>_nll``, ``<name>_ppl``) into the log history, beside the losses.
    """
    from transformers import set_seed

    from slimlm.distill.options import DistillOptions
    from slimlm.distill.trainer import DistillationTrainer
    from slimlm.distill.items import training_items_of, training_set
    from slimlm.distill.mixture import SourceMixture, corpus_sources
    from slimlm.distill.training import fit_schedule_callback, heldout_eval_callback, student_precision_flags, \
        time_budget_callback, tokens_per_step, training_arguments
    from slimlm.fingerprint import model_fingerprint
    from slimlm.models import save_dtype as resolve_save_dtype

    options = options if options is not None else DistillOptions()
    if not 0 <= mix_fraction <= 1:
        raise InputError(f"mix_fraction must be in [0, 1], got {mix_fraction}")
    if options.fit_to_time and not options.max_minutes:
        raise InputError("fit_to_time fits the schedule to max_minutes: give max_minutes too")
    if teacher_cache is not None and (synthetic_texts or synthetic_caches) and mix_fraction > 0:
        raise InputError("a top-k cache of the training blocks replaces the teacher for the whole run: synthetic "
                         "text does not mix in there")
    if options.corpus_sources:
        from slimlm.shards import TokenShards

        if teacher_cache is not None:
            raise InputError("corpus_sources draws each batch from one of the corpus's sources; a top-k cache of the "
                             "training blocks is read in its own order: drop one of them")
        if not isinstance(train, TokenShards):
            raise InputError("corpus_sources needs the training data as token shards (slimlm tokenize), which "
                             "record each token's data source")
        train.source_ranges()  # shards of an older slimlm are refused before any work
    config = options.distillation_config(layer_map=layer_map, topk=teacher_cache)
    seq_len, batch_size = options.seq_len, options.batch_size
    out = outputs.check_output(out, overwrite)
    checkpoints = checkpoints or out + ".checkpoints"
    student_before = model_fingerprint(student)
    inputs = distill_inputs(teacher, student, train, options, synthetic_texts=synthetic_texts,
                            mix_fraction=mix_fraction, seed=seed, training_args=training_args, layer_map=layer_map,
                            teacher_cache=teacher_cache, synthetic_caches=synthetic_caches)
    saved_dtype = resolve_save_dtype(student, save_dtype)
    args = training_arguments(student_precision_flags(options.student_precision, training_args, log=log),
                              output_dir=checkpoints, batch_size=batch_size, learning_rate=options.lr, seed=seed)
    args.disable_tqdm = args.disable_tqdm or disable_tqdm
    # An explicit --resume_from_checkpoint is the user's choice: the folder is left as it is.
    decision = {"clear": False, "resume": None, "incomplete": []} if args.resume_from_checkpoint else \
        plan_checkpoints(checkpoints, inputs, resume=resume, clear_stale=clear_stale_checkpoints)
    set_seed(seed)

    explicit_steps = any(flag.split("=")[0] == "--max_steps" for flag in training_args)
    if options.max_tokens is not None and not explicit_steps:
        args.max_steps = max(1, math.ceil(options.max_tokens / tokens_per_step(args, seq_len)))
    mixed = bool(synthetic_texts or synthetic_caches) and mix_fraction > 0
    mix_callbacks = []
    if teacher_cache is not None:
        dataset = None  # the cache's blocks (DistillationTrainer)
    elif (mixed and (synthetic_caches or options.dynamic_mix)) or options.corpus_sources:
        if args.max_steps is None or args.max_steps < 1:
            raise InputError("a mix of sources is drawn for a known number of steps: give max_tokens or --max_steps")
        synthetic = synthetic_blocks(synthetic_texts, synthetic_caches, tokenizer, options, student=student, log=log) \
            if mixed else {}
        if mixed and not synthetic:
            raise InputError("no synthetic source holds a block of seq_len tokens: generate more text or lower "
                             "synthetic.mix to 0")
        num_items = args.max_steps * tokens_per_step(args, seq_len) // seq_len
        classic = training_items_of(train, tokenizer, seq_len, model=student)
        if options.corpus_sources:
            classic = corpus_sources(train, classic, seq_len)
            log("[distill] the corpus's sources: " + ", ".join(f"{name} {len(blocks):,} blocks"
                                                              for name, blocks in classic.items()))
        dataset, mix_callbacks = source_mixture(classic, synthetic, mix_fraction if mixed else 0.0, options,
                                                num_items=num_items, seed=seed, teacher=teacher, log=log)
    else:
        synthetic = synthetic_blocks(synthetic_texts, None, tokenizer, options, student=student, log=log) \
            if mixed else None
        synthetic = [item for part in synthetic.values() for item in part] if synthetic else None
        # with a known step count, mix_fraction of the items the run reads are synthetic (repeated
        # when there are fewer), however large the corpus it reads a part of
        known = args.max_steps is not None and args.max_steps > 0
        dataset = training_set(training_items_of(train, tokenizer, seq_len, model=student), synthetic, mix_fraction,
                               seed=seed, num_items=args.max_steps * tokens_per_step(args, seq_len) // seq_len
                               if known and synthetic else None)
        if known and synthetic and dataset.num_synthetic > len(synthetic):
            log(f"[distill] the teacher-written text is {len(synthetic):,} blocks; {mix_fraction:.0%} of the run's "
                f"{dataset.num_items:,} (at most) is {dataset.num_synthetic:,}: each is read up to "
                f"{dataset.num_synthetic / len(synthetic):.1f} times")

    max_minutes = options.max_minutes
    callbacks = [time_budget_callback(max_minutes * 60)] if max_minutes else []
    callbacks += mix_callbacks
    if options.fit_to_time:  # before the evaluation callback, which evaluates at the (fitted) last step
        callbacks.insert(0, fit_schedule_callback(max_minutes * 60, log=log))
    if eval_texts and options.eval_steps:
        sets = {name: eval_blocks(data, tokenizer, seq_len, options.eval_blocks, model=student)
                for name, data in eval_texts.items()}
        callbacks.append(heldout_eval_callback(sets, options.eval_steps, batch_size=batch_size, log=log))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  distillation_config=config, callbacks=callbacks or None)
    _prepare_checkpoints(trainer, checkpoints, decision, inputs, resume=resume, log=log)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or decision["resume"])
    if trainer.state.global_step == 0:
        raise RuntimeError(f"the distillation trained 0 steps ({len(trainer.train_dataset)} training items, max_steps "
                           f"{args.max_steps}); {out} is left as it was")

    record = {"teacher_fingerprint": model_fingerprint(teacher) if teacher is not None else None,
              "student_fingerprint_before": student_before,
              "inputs": with_save_dtype(inputs, saved_dtype), "train_data": data_digest(train),
              "num_train_items": len(trainer.train_dataset),
              "max_steps": args.max_steps, "seq_len": seq_len, "learning_rate": args.learning_rate,
              "distillation": vars(config), "precision_used": precision_used(trainer),
              **({"data_mix": [{"from_batch": start, "weights": weights} for start, weights in dataset.history]}
                 if isinstance(dataset, SourceMixture) else {}),
              **(extra_record or {})}
    _save_student(trainer, tokenizer, out, record, seq_len, saved_dtype)
    return trainer.model, trainer.state.log_history


def precision_used(trainer) -> dict:
    """What "auto" resolved to here, in the dtype table's names: the teacher's forward dtype
    ("float32", "bfloat16", "float16", "int8"; None for a top-k cache) and the student's mixed
    precision ("bfloat16", "float16" or "float32")."""
    teacher = getattr(trainer, "teacher", None)
    if teacher is None:  # a top-k cache: no live teacher
        name = None
    elif any("quantized" in type(module).__module__ for module in teacher.modules()):
        name = "int8"
    else:
        name = str(next(teacher.parameters()).dtype).removeprefix("torch.")
    return {"teacher": name,
            "student": "bfloat16" if trainer.args.bf16 else "float16" if trainer.args.fp16 else "float32"}


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



# The least distillation time ``distill.finish_by_minutes`` leaves a run whose earlier stages overran.
MIN_DISTILL_MINUTES = 1.0


def distill_minutes(section: dict, started: float, log=print) -> float | None:
    """``distill.max_minutes``, shortened so that distillation ends ``distill.finish_by_minutes``
    after the run began (``started``: its ``time.monotonic()``), but at least
    ``MIN_DISTILL_MINUTES``: a run whose earlier stages overran still distills, and says so."""
    import time

    cap, finish_by = section["max_minutes"], section["finish_by_minutes"]
    if finish_by is None:
        return cap
    elapsed = (time.monotonic() - started) / 60
    left = finish_by - elapsed
    minutes = max(left, MIN_DISTILL_MINUTES) if cap is None else min(cap, max(left, MIN_DISTILL_MINUTES))
    if cap is None or minutes < cap:
        note = f"; {left:.1f} left, at least {MIN_DISTILL_MINUTES}" if left < MIN_DISTILL_MINUTES else ""
        log(f"[distill] {elapsed:.1f} min into the run, finish_by_minutes {finish_by:g}: distillation capped "
            f"at {minutes:.1f} min" + (f" (max_minutes {cap:g})" if cap is not None else "") + note)
    return minutes


class DistillStage(Stage):
    """The pruned student distilled from the teacher (``distilled/``) — from the corrected
    teacher after a ``correct_teacher`` stage —, saved in the recipe's ``save_dtype`` (auto: the
    pruned model's, i.e. the teacher's source dtype); its value is the log history. After a search
    with re-ranking the student is the winner's short-distilled one (``search/winner``) and
    trains ``max_tokens`` minus the tokens it has already seen."""

    name, output = "distill", "distilled"

    @staticmethod
    def _start(ctx: RunContext, done: dict) -> tuple[str, int | None, int]:
        """The folder the student starts from, the tokens left to train and those the search's
        re-ranking already trained it on."""
        max_tokens = ctx.recipe["distill"]["max_tokens"]
        rerank = (done.get("search") or {}).get("rerank_tokens") or 0
        if not rerank:
            return ctx.path("pruned"), max_tokens, 0
        from slimlm.search.records import WINNER_DIR

        return (os.path.join(ctx.path("search"), WINNER_DIR), max_tokens - rerank if max_tokens is not None else None,
                rerank)

    def inputs(self, ctx: RunContext, done: dict) -> dict:
        import dataclasses

        import torch

        from slimlm.distill.options import DistillOptions
        from slimlm.models import load_model, save_dtype

        start, max_tokens, rerank = self._start(ctx, done)
        if rerank:
            ctx.log(f"[distill] continuing from the search's winner ({os.path.relpath(start, ctx.out)}, "
                    f"{rerank:,} tokens distilled)")
        section = ctx.recipe["distill"]
        self.teacher = done.get("correct_teacher", ctx.teacher)
        self.student = load_model(start, dtype=torch.float32 if ctx.device == "cpu" else ctx.dtype)
        # auto: the teacher's source dtype (the pruned model's), also for a student started from
        # the search's winner, which is kept in the dtype it trained in.
        self.save_dtype = section_dtype = ctx.recipe["save_dtype"]
        if section_dtype == "auto":
            self.save_dtype = str(save_dtype(ctx.teacher, "auto")).removeprefix("torch.")
        self.options = dataclasses.replace(DistillOptions(**section), max_tokens=max_tokens)
        self.layer_map = pruned_layer_map(start, self.student, self.teacher) \
            if self.options.hidden_loss_weight > 0 else None
        synthetic = done.get("synthetic")
        cache = done.get("teacher_cache")
        if cache is not None:  # the cached teacher replaces the live one
            self.teacher = None
        # Teacher-written text: its cached targets when the synthetic stage kept them, else its texts by source.
        caches = synthetic.caches if synthetic is not None and synthetic.caches else None
        texts = synthetic.texts_by_source() if synthetic is not None and not caches else None
        self.data = dict(synthetic_texts=texts, synthetic_caches=caches,
                         mix_fraction=ctx.recipe["synthetic"]["mix"] if synthetic is not None else 0.0,
                         seed=ctx.recipe["seed"], training_args=ctx.training_flags(), layer_map=self.layer_map,
                         teacher_cache=cache)
        self.train = done["tokenize"]["train"]
        self.eval_sets = {name: done["tokenize"][name] for name in ("heldout", *general_sets(ctx.recipe))}
        inputs = distill_inputs(self.teacher, self.student, self.train, self.options, **self.data)
        return with_save_dtype(inputs, save_dtype(self.student, self.save_dtype))

    def stale_reason(self, ctx: RunContext, inputs: dict) -> str | None:
        return distilled_stale_reason(ctx.path(self.output), inputs)

    def run(self, ctx: RunContext, done: dict, inputs: dict) -> list[dict]:
        import dataclasses

        max_minutes = distill_minutes(ctx.recipe["distill"], ctx.started, ctx.log)
        options = dataclasses.replace(self.options, max_minutes=max_minutes)
        # Checkpoints of a run of other inputs (a changed teacher, data or setting) are stale in
        # this folder the recipe owns: they are deleted, not resumed.
        _, log_history = distill_stage(
            self.teacher, self.student, ctx.tokenizer, self.train, ctx.path(self.output), options,
            extra_record={"max_minutes": max_minutes}, overwrite=True, clear_stale_checkpoints=True,
            disable_tqdm=not ctx.progress, save_dtype=self.save_dtype, log=ctx.log, eval_texts=self.eval_sets,
            **self.data)
        return log_history

    def load(self, ctx: RunContext, done: dict) -> list[dict]:
        return read_json(os.path.join(ctx.path(self.output), DISTILL_RECORD))["log_history"]
