"""The pipeline's stages as plain functions, shared by the ``slimlm`` subcommands and ``slimlm run``.

Each stage takes loaded models and data, writes one output (a folder or a file) and
returns what the next stage needs. ``output_state`` says whether an output already exists
and is complete, which is how ``run`` skips finished stages and resumes interrupted ones.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time

import torch

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.outputs import check_output, write_json

DISTILL_RECORD = "slimlm_distill.json"
STAGE_RECORD = "slimlm_stage.json"
RUN_RECORD = "slimlm_run.json"
SYNTHETIC_DONE_SUFFIX = ".done.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

__all__ = ["InputError", "check_output", "write_json"]


# ------------------------------------------------------------------ helpers
def resolve_dtype(name: str | None, device: str) -> torch.dtype | None:
    """``auto`` → float32 on CPU (bf16 matmuls are slow there) and bfloat16 on CUDA."""
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in table:
        raise InputError(f"unknown dtype {name!r}; choose one of auto, {', '.join(table)}")
    return table[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def texts_digest(texts) -> str:
    """A short hash of a list of documents (identifies a data split in records)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()[:16]


def read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_json_roundtrip(value):
    """``value`` as it reads back from JSON (tuples → lists, other objects → str), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def has_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)


def to_blocks(texts, tokenizer, seq_len: int, model=None):
    from slimlm.data import tokenize_blocks

    return tokenize_blocks(texts, tokenizer, seq_len, pack=True, model=model)


def stage_record(inputs: dict) -> dict:
    """What a stage records about its inputs, as it reads back from JSON."""
    return {"inputs": read_json_roundtrip(inputs)}


def changed_inputs(record: dict | None, inputs: dict) -> list[str]:
    """The names of the inputs that differ from those ``record`` was made from."""
    stored, current = (record or {}).get("inputs") or {}, read_json_roundtrip(inputs)
    return sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))


def _inputs_state(record: dict | None, inputs: dict, missing: str) -> str | None:
    if record is None:
        return missing
    changed = changed_inputs(record, inputs)
    return f"made from other inputs ({', '.join(changed)} changed)" if changed else None


def load_scores(folder: str, model=None):
    """``ImportanceScores.load`` with an unreadable or truncated file as an InputError naming it."""
    from slimlm.importance import ImportanceScores

    try:
        return ImportanceScores.load(folder, model=model)
    except ValueError:
        raise
    except Exception as error:  # safetensors raises its own error type for a torn file
        raise InputError(f"scores {folder}: unreadable scores.safetensors ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None


# ------------------------------------------------------------------ stages
def importance_stage(model, calibration, out: str, *, metrics=("activation",), depth=("block_influence",),
                     num_samples: int | None = None, batch_size: int = 8, seed: int = 0, loss_drop_samples=None,
                     progress: bool = True, inputs: dict | None = None):
    """Score ``model`` on ``calibration`` (TokenBlocks; ``num_samples`` drawn with ``seed``) and
    save to ``out`` atomically, with ``inputs`` (what the scores were made from) recorded beside."""
    from slimlm.importance import estimate_importance

    if num_samples is not None:
        calibration = calibration.sample(num_samples, seed)
    scores = estimate_importance(model, calibration, metrics=tuple(metrics), depth=tuple(depth),
                                 batch_size=batch_size, progress=progress, loss_drop_samples=loss_drop_samples)
    with outputs.atomic_output(out) as staging:
        scores.save(staging)
        if inputs is not None:
            write_json(os.path.join(staging, STAGE_RECORD), stage_record(inputs))
    return scores


def scores_state(out: str, model, inputs: dict | None = None) -> str | None:
    """None when ``out`` holds scores of ``model`` made from ``inputs``, else why not."""
    from slimlm.fingerprint import model_fingerprint

    if not os.path.isdir(out):
        return "missing"
    try:
        scores = load_scores(out)
    except Exception as error:  # any unreadable file means: compute again
        return f"unreadable ({error})"
    if scores.meta.get("fingerprint") != model_fingerprint(model):
        return "computed on another model"
    if inputs is not None:
        return _inputs_state(read_json(os.path.join(out, STAGE_RECORD)), inputs, f"no {STAGE_RECORD}")
    return None


def prune_stage(model, scores, target, out: str, *, tokenizer=None, overwrite: bool = False,
                inputs: dict | None = None):
    """Prune ``model`` in place to ``target`` with ``scores``, save it to ``out`` (recording
    ``inputs``); returns (model, plan)."""
    from slimlm.surgery import plan, prune, save_pruned

    the_plan = plan(model, target)
    pruned = prune(model, scores, the_plan)
    save_pruned(pruned, out, tokenizer=tokenizer, overwrite=overwrite,
                record=stage_record(inputs) if inputs is not None else None)
    return pruned, the_plan


def pruned_state(out: str, source_fingerprint: str, inputs: dict | None = None) -> str | None:
    from slimlm.surgery.save import RECORD_FILE

    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, RECORD_FILE))
    if record is None:
        return f"no {RECORD_FILE}"
    if record.get("source_fingerprint") != source_fingerprint:
        return "pruned from another model"
    return _inputs_state(record, inputs, "") if inputs is not None else None


def synthetic_inputs(teacher, prompts, *, max_new_tokens=64, temperature=0.8, top_p=0.95, num_return_sequences=1,
                     batch_size=8, seed=0, chat_template=None) -> dict:
    """Everything a synthetic file depends on (batches are seeded by their first prompt, so the batch size counts)."""
    from slimlm.fingerprint import model_fingerprint

    return {"teacher": model_fingerprint(teacher), "prompts": texts_digest(prompts),
            "sampling": {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                         "num_return_sequences": num_return_sequences, "batch_size": batch_size, "seed": seed,
                         "chat_template": chat_template}}


def generate_stage(teacher, tokenizer, prompts, out: str, *, max_new_tokens=64, temperature=0.8, top_p=0.95,
                   num_return_sequences=1, batch_size=8, seed=0, chat_template=None, progress=True, log=print):
    """Sample synthetic text from ``teacher`` into a staging sibling of the JSONL ``out``
    (continuing one an interrupted run of these same inputs left), swap it into place, then
    mark it complete with ``<out>.done.json`` (the inputs and the file's digest)."""
    from slimlm.distill.generate import generate_synthetic

    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    num_return_sequences=num_return_sequences, batch_size=batch_size, seed=seed,
                    chat_template=chat_template)
    inputs = read_json_roundtrip(synthetic_inputs(teacher, prompts, **settings))
    staging = outputs.staging_path(out)
    staging_inputs = staging + ".inputs.json"
    if os.path.exists(staging):
        if read_json(staging_inputs) == {"inputs": inputs}:
            log(f"[synthetic] continuing the partial {staging}")
        else:
            log(f"[synthetic] discarding {staging}: left by a run of other inputs")
            outputs.remove(staging)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_json(staging_inputs, {"inputs": inputs})
    dataset = generate_synthetic(teacher, tokenizer, prompts, out_path=staging, progress=progress, **settings)
    if len(dataset) == 0:
        raise RuntimeError(f"the teacher produced no usable generation for {len(prompts)} prompts")
    outputs.commit(staging, out)
    write_json(out + SYNTHETIC_DONE_SUFFIX, {"records": len(dataset), "inputs": inputs,
                                             "sha256": outputs.file_digest(out)})
    outputs.remove(staging_inputs)
    return dataset


def synthetic_state(out: str, inputs: dict) -> str | None:
    """None when ``out`` is complete, unchanged since written, and made from ``inputs``."""
    if not os.path.isfile(out):
        return "missing"
    record = read_json(out + SYNTHETIC_DONE_SUFFIX)
    if record is None:
        return "incomplete"
    if record.get("sha256") != outputs.file_digest(out):
        return "changed since it was written"
    return _inputs_state(record, inputs, "incomplete")


def time_budget_callback(seconds: float):
    """A TrainerCallback that stops training (and saves) once ``seconds`` of wall time have
    passed since training began (transformers is imported only when distilling)."""
    from transformers import TrainerCallback

    class TimeBudgetCallback(TrainerCallback):
        def __init__(self):
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - self.start > seconds:
                control.should_training_stop = True
                control.should_save = True
            return control

    return TimeBudgetCallback()


def training_items(blocks) -> list[dict]:
    """Trainer items from TokenBlocks: labels = input_ids with -100 on padding."""
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            for ids, mask in zip(blocks.input_ids, blocks.attention_mask)]


def training_arguments(flags=(), *, output_dir: str, batch_size: int = 8, learning_rate: float = 1e-4,
                       seed: int = 0):
    """``TrainingArguments`` from command-line style ``flags``, over slimlm's defaults (cosine
    schedule, 5% warmup, a log every step, a checkpoint every 50 steps, no reporting);
    on a machine without CUDA, ``--use_cpu`` (and gloo under torchrun). InputError for a flag
    TrainingArguments does not know."""
    from transformers import HfArgumentParser, TrainingArguments

    defaults = ["--output_dir", output_dir, "--per_device_train_batch_size", str(batch_size),
                "--learning_rate", str(learning_rate), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
                "--weight_decay", "0.0", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "50",
                "--save_total_limit", "1", "--report_to", "none", "--seed", str(seed), "--max_grad_norm", "1.0",
                "--dataloader_num_workers", "0"]
    if not torch.cuda.is_available():
        # Without these a CPU process under torchrun/accelerate trains alone (world size 1).
        defaults += ["--use_cpu", "true"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            defaults += ["--ddp_backend", "gloo"]
    parser = HfArgumentParser(TrainingArguments)
    args, remaining = parser.parse_args_into_dataclasses(args=defaults + list(flags), return_remaining_strings=True)
    if remaining:
        raise InputError(f"unknown option(s) for distill: {' '.join(remaining)} (not a slimlm or TrainingArguments flag)")
    if args.bf16 and str(args.device) == "cpu" and not cpu_has_bf16():
        raise InputError("--bf16 on this CPU would be slower than float32: it has no AVX512-BF16 or AMX instructions")
    return args


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def distill_inputs(teacher, student, train_texts, *, synthetic_texts=None, mix_fraction=0.0, seq_len=256,
                   max_tokens=None, batch_size=8, learning_rate=1e-4, temperature=1.0, beta=0.0, kd_weight=1.0,
                   ce_weight=0.0, seed=0, training_args=()) -> dict:
    """Everything a distillation run depends on: the models' fingerprints, the data's digests
    and the training arguments. A checkpoint folder is resumed only by a run with the same."""
    from slimlm.fingerprint import model_fingerprint

    mixed = bool(synthetic_texts) and mix_fraction > 0
    return read_json_roundtrip({
        "teacher": model_fingerprint(teacher), "student": model_fingerprint(student),
        "train": texts_digest(train_texts), "synthetic": texts_digest(synthetic_texts) if mixed else None,
        "mix": mix_fraction if mixed else 0.0, "seq_len": seq_len, "max_tokens": max_tokens,
        "batch_size": batch_size, "learning_rate": learning_rate, "temperature": temperature, "beta": beta,
        "kd_weight": kd_weight, "ce_weight": ce_weight, "seed": seed, "training_args": list(training_args)})


def check_distill_settings(*, learning_rate, temperature, beta, kd_weight, ce_weight, max_minutes=None,
                           mix_fraction=0.0) -> None:
    """InputError for a setting no run can use, before anything is loaded or written."""
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


def _checkpoint_steps(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def checkpoint_complete(path: str, step: int) -> bool:
    """A checkpoint the Trainer finished writing: its trainer state (written last) reads back
    with this step, and the weights are there."""
    state = read_json(os.path.join(path, "trainer_state.json"))
    return state is not None and state.get("global_step") == step and any(
        os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)


def _own_checkpoints(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, RUN_RECORD)) or all(
        name.startswith(("checkpoint-", "runs", ".")) for name in os.listdir(folder))


def plan_checkpoints(folder: str, inputs: dict, *, resume: bool, clear_stale: bool) -> dict:
    """What to do with the checkpoint folder of a run of ``inputs`` (decided before anything
    changes): {"clear": bool, "resume": path or None, "incomplete": [paths to delete]}.
    A folder of another run is refused (InputError) unless ``clear_stale``; ``resume=False``
    starts over. Only a folder slimlm wrote is ever cleared."""
    decision = {"clear": False, "resume": None, "incomplete": []}
    if not os.path.isdir(folder) or not os.listdir(folder):
        return decision
    record = read_json(os.path.join(folder, RUN_RECORD))
    same_run = record is not None and record.get("inputs") == inputs
    if not resume or not same_run:
        if resume and not clear_stale:
            why = f"{', '.join(changed_inputs(record, inputs))} changed" if record is not None else \
                f"no {RUN_RECORD} says which"
            raise InputError(f"checkpoints {folder} belong to another run ({why}); pass --overwrite to delete them "
                             "and start over")
        if not _own_checkpoints(folder):
            raise InputError(f"checkpoints folder {folder} holds files slimlm did not write; remove it yourself")
        decision["clear"] = True
        return decision
    for step, path in reversed(_checkpoint_steps(folder)):
        if checkpoint_complete(path, step):
            decision["resume"] = path
            break
        decision["incomplete"].append(path)
    return decision


def distill_stage(teacher, student, tokenizer, train_texts, out: str, *, synthetic_texts=None, mix_fraction=0.0,
                  seq_len=256, max_tokens=None, batch_size=8, learning_rate=1e-4, temperature=1.0, beta=0.0,
                  kd_weight=1.0, ce_weight=0.0, seed=0, training_args=(), resume=True, overwrite=False,
                  clear_stale_checkpoints=False, checkpoints: str | None = None, max_minutes: float | None = None,
                  disable_tqdm: bool = False, extra_record=None, log=print):
    """Distill ``teacher`` into ``student`` on blocks of ``train_texts`` (and, with
    ``mix_fraction`` > 0, packed ``synthetic_texts``), then save the student to ``out`` atomically.

    ``max_tokens`` sets ``max_steps`` = ⌈max_tokens / (batch · accumulation · world · seq_len)⌉
    unless ``training_args`` names ``--max_steps``. ``training_args``: command-line style
    ``TrainingArguments`` flags (``["--warmup_steps", "0.1"]``), which win over these defaults.
    ``max_minutes`` stops training early (a safety cap on a loaded machine; the schedule
    still follows ``max_steps``, and a rerun may change it and still resume).

    Checkpoints go to ``checkpoints`` (default ``<out>.checkpoints``), which records the run's
    ``distill_inputs``. With ``resume``, the newest complete checkpoint of this same run is
    continued (incomplete ones, left by a kill, are deleted); a folder of another run is
    refused unless ``clear_stale_checkpoints``, which deletes it. ``resume=False`` starts
    over. Returns (student, log_history).
    """
    from transformers import set_seed

    from slimlm.distill.generate import mix
    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
    from slimlm.fingerprint import model_fingerprint

    check_distill_settings(learning_rate=learning_rate, temperature=temperature, beta=beta, kd_weight=kd_weight,
                           ce_weight=ce_weight, max_minutes=max_minutes, mix_fraction=mix_fraction)
    checkpoints = checkpoints or out.rstrip(os.sep) + ".checkpoints"
    student_before = model_fingerprint(student)
    inputs = distill_inputs(teacher, student, train_texts, synthetic_texts=synthetic_texts, mix_fraction=mix_fraction,
                            seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                            learning_rate=learning_rate, temperature=temperature, beta=beta, kd_weight=kd_weight,
                            ce_weight=ce_weight, seed=seed, training_args=training_args)
    check_output(out, overwrite)
    args = training_arguments(training_args, output_dir=checkpoints, batch_size=batch_size,
                              learning_rate=learning_rate, seed=seed)
    args.disable_tqdm = args.disable_tqdm or disable_tqdm
    # An explicit --resume_from_checkpoint is the user's choice: the folder is left as it is.
    decision = {"clear": False, "resume": None, "incomplete": []} if args.resume_from_checkpoint else \
        plan_checkpoints(checkpoints, inputs, resume=resume, clear_stale=clear_stale_checkpoints)
    set_seed(seed)

    classic = training_items(to_blocks(train_texts, tokenizer, seq_len, model=student))
    if synthetic_texts and mix_fraction > 0:
        synthetic = training_items(to_blocks(synthetic_texts, tokenizer, seq_len, model=student))
        # All classic blocks stay in; synthetic blocks join up to ``mix_fraction`` of the total
        # (fewer when there are not enough of them; none is repeated).
        wanted = len(classic) * mix_fraction / (1.0 - mix_fraction) if mix_fraction < 1 else len(synthetic)
        num_synthetic = min(len(synthetic), round(wanted))
        total = len(classic) + num_synthetic if mix_fraction < 1 else num_synthetic
        dataset = mix(classic, synthetic, synthetic_fraction=num_synthetic / total, num_samples=total, seed=seed)
    else:
        dataset = classic
    explicit_steps = any(flag.split("=")[0] == "--max_steps" for flag in training_args)
    if max_tokens is not None and not explicit_steps:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * seq_len
        args.max_steps = max(1, math.ceil(max_tokens / per_step))

    config = DistillationConfig(kd_weight=kd_weight, ce_weight=ce_weight, temperature=temperature, beta=beta)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  distillation_config=config,
                                  callbacks=[time_budget_callback(max_minutes * 60)] if max_minutes else None)
    # Every rank decided the same from the folder as it was; once all have, rank 0 alone changes it.
    main_process = trainer.is_world_process_zero()
    trainer.accelerator.wait_for_everyone()
    if main_process:
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
        write_json(os.path.join(checkpoints, RUN_RECORD), {"inputs": inputs})
    trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint or decision["resume"])

    # Every rank takes part in saving (FSDP/DeepSpeed gather the weights); rank 0 writes, into a
    # staging folder swapped into place, so ``out`` never holds half a checkpoint.
    staging = outputs.staging_path(out)
    if main_process:
        outputs.prepare(out)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if main_process:
        tokenizer.save_pretrained(staging)
        record = {"teacher_fingerprint": model_fingerprint(teacher), "student_fingerprint_before": student_before,
                  "inputs": inputs, "train_texts": texts_digest(train_texts), "num_train_items": len(dataset),
                  "max_steps": args.max_steps, "seq_len": seq_len, "learning_rate": args.learning_rate,
                  "steps": trainer.state.global_step,
                  "tokens_seen": int(trainer.state.global_step * args.per_device_train_batch_size
                                     * args.gradient_accumulation_steps * args.world_size * seq_len),
                  "train_seconds": next((entry["train_runtime"] for entry in reversed(trainer.state.log_history)
                                         if "train_runtime" in entry), None),
                  "distillation": vars(config), "log_history": trainer.state.log_history, **(extra_record or {})}
        write_json(os.path.join(staging, DISTILL_RECORD), record)
        outputs.commit(staging, out)
    trainer.accelerator.wait_for_everyone()
    return trainer.model, trainer.state.log_history


def distilled_state(out: str, inputs: dict) -> str | None:
    """None when ``out`` holds a student distilled from ``inputs`` (``distill_inputs``)."""
    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, DISTILL_RECORD))
    if record is None:
        return f"no {DISTILL_RECORD}"
    return _inputs_state(record, inputs, "")
