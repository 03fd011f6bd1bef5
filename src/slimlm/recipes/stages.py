"""The pipeline's stages as plain functions, shared by the ``slimlm`` subcommands and ``slimlm run``.

Each stage takes loaded models and data, writes one output (a folder or a file) and
returns what the next stage needs. ``output_state`` says whether an output already exists
and is complete, which is how ``run`` skips finished stages and resumes interrupted ones.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time

import torch

DISTILL_RECORD = "slimlm_distill.json"
SYNTHETIC_DONE_SUFFIX = ".done.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class InputError(ValueError):
    """Bad input from the user (a path, a value, a recipe field): exit code 2."""


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


def check_output(path: str, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing non-empty output (file or folder) unless ``overwrite``."""
    if os.path.isdir(path) and os.listdir(path) or os.path.isfile(path):
        if not overwrite:
            raise InputError(f"{what} {path} already exists; pass --overwrite to replace it")


def remove_output(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


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


def write_json(path: str, value) -> None:
    """Write JSON atomically (temp file + rename), so a reader never sees half a record."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump(value, stream, indent=2, default=str)
    os.replace(temp, path)


def has_weights(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES)


def to_blocks(texts, tokenizer, seq_len: int, model=None):
    from slimlm.data import tokenize_blocks

    return tokenize_blocks(texts, tokenizer, seq_len, pack=True, model=model)


# ------------------------------------------------------------------ stages
def importance_stage(model, calibration, out: str, *, metrics=("activation",), depth=("block_influence",),
                     num_samples: int | None = None, batch_size: int = 8, seed: int = 0, loss_drop_samples=None,
                     progress: bool = True):
    """Score ``model`` on ``calibration`` (TokenBlocks; ``num_samples`` drawn with ``seed``) and save to ``out``."""
    from slimlm.importance import estimate_importance

    if num_samples is not None:
        calibration = calibration.sample(num_samples, seed)
    scores = estimate_importance(model, calibration, metrics=tuple(metrics), depth=tuple(depth),
                                 batch_size=batch_size, progress=progress, loss_drop_samples=loss_drop_samples)
    scores.save(out)
    return scores


def scores_state(out: str, model) -> str | None:
    """None when ``out`` holds scores of ``model``, else why not."""
    from slimlm.importance import ImportanceScores, model_fingerprint

    if not os.path.isdir(out):
        return "missing"
    try:
        scores = ImportanceScores.load(out)
    except Exception as error:  # any unreadable file means: compute again
        return f"unreadable ({error})"
    if scores.meta.get("fingerprint") != model_fingerprint(model):
        return "computed on another model"
    return None


def prune_stage(model, scores, target, out: str, *, tokenizer=None, overwrite: bool = False):
    """Prune ``model`` in place to ``target`` with ``scores``, save it to ``out``; returns (model, plan)."""
    from slimlm.surgery import plan, prune, save_pruned

    the_plan = plan(model, target)
    pruned = prune(model, scores, the_plan)
    save_pruned(pruned, out, tokenizer=tokenizer, overwrite=overwrite)
    return pruned, the_plan


def pruned_state(out: str, source_fingerprint: str) -> str | None:
    from slimlm.surgery.save import RECORD_FILE

    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, RECORD_FILE))
    if record is None:
        return f"no {RECORD_FILE}"
    if record.get("source_fingerprint") != source_fingerprint:
        return "pruned from another model"
    return None


def generate_stage(teacher, tokenizer, prompts, out: str, *, max_new_tokens=64, temperature=0.8, top_p=0.95,
                   num_return_sequences=1, batch_size=8, seed=0, chat_template=None, progress=True):
    """Sample synthetic text from ``teacher`` into the JSONL ``out`` (resuming a partial file),
    then mark it complete with ``<out>.done.json``."""
    from slimlm.distill.generate import generate_synthetic
    from slimlm.importance import model_fingerprint

    dataset = generate_synthetic(teacher, tokenizer, prompts, out_path=out, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
                                 batch_size=batch_size, seed=seed, chat_template=chat_template, progress=progress)
    if len(dataset) == 0:
        raise RuntimeError(f"the teacher produced no usable generation for {len(prompts)} prompts")
    write_json(out + SYNTHETIC_DONE_SUFFIX, {"records": len(dataset), "prompts": texts_digest(prompts),
                                             "teacher": model_fingerprint(teacher)})
    return dataset


def synthetic_state(out: str, prompts, teacher_fingerprint: str) -> str | None:
    record = read_json(out + SYNTHETIC_DONE_SUFFIX)
    if not os.path.isfile(out):
        return "missing"
    if record is None:
        return "incomplete"
    if record.get("prompts") != texts_digest(prompts) or record.get("teacher") != teacher_fingerprint:
        return "made from other prompts or another teacher"
    return None


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


def distill_stage(teacher, student, tokenizer, train_texts, out: str, *, synthetic_texts=None, mix_fraction=0.0,
                  seq_len=256, max_tokens=None, batch_size=8, learning_rate=1e-4, temperature=1.0, beta=0.0,
                  kd_weight=1.0, ce_weight=0.0, seed=0, training_args=(), resume=True, overwrite=False,
                  checkpoints: str | None = None, max_minutes: float | None = None, disable_tqdm: bool = False,
                  extra_record=None):
    """Distill ``teacher`` into ``student`` on blocks of ``train_texts`` (and, with
    ``mix_fraction`` > 0, packed ``synthetic_texts``), then save the student to ``out``.

    ``max_tokens`` sets ``max_steps`` = ⌈max_tokens / (batch · accumulation · world · seq_len)⌉
    unless ``training_args`` names ``--max_steps``. ``training_args``: command-line style
    ``TrainingArguments`` flags (``["--warmup_steps", "0.1"]``), which win over these defaults.
    ``max_minutes`` stops training early (a safety cap on a loaded machine; the schedule
    still follows ``max_steps``). Checkpoints go to ``checkpoints`` (default ``<out>.checkpoints``); with ``resume`` the
    newest one there is continued. Returns (student, log_history).
    """
    from transformers import set_seed

    from slimlm.distill.generate import mix
    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
    from slimlm.importance import model_fingerprint

    checkpoints = checkpoints or out.rstrip(os.sep) + ".checkpoints"
    student_before = model_fingerprint(student)
    check_output(out, overwrite)
    args = training_arguments(training_args, output_dir=checkpoints, batch_size=batch_size,
                              learning_rate=learning_rate, seed=seed)
    args.disable_tqdm = args.disable_tqdm or disable_tqdm
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
    last = None
    if resume and os.path.isdir(checkpoints):
        found = sorted(glob.glob(os.path.join(checkpoints, "checkpoint-*")),
                       key=lambda path: int(path.rsplit("-", 1)[-1]) if path.rsplit("-", 1)[-1].isdigit() else -1)
        last = found[-1] if found else None
    explicit_resume = args.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=explicit_resume or last)

    # Every rank takes part in saving (FSDP/DeepSpeed gather the weights); rank 0 writes, into a
    # staging folder renamed into place, so ``out`` never holds half a checkpoint.
    staging = out.rstrip(os.sep) + ".saving"
    if trainer.is_world_process_zero():
        remove_output(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(staging)
        record = {"teacher_fingerprint": model_fingerprint(teacher), "student_fingerprint_before": student_before,
                  "train_texts": texts_digest(train_texts), "num_train_items": len(dataset),
                  "max_steps": args.max_steps, "seq_len": seq_len, "learning_rate": args.learning_rate,
                  "steps": trainer.state.global_step,
                  "tokens_seen": int(trainer.state.global_step * args.per_device_train_batch_size
                                     * args.gradient_accumulation_steps * args.world_size * seq_len),
                  "train_seconds": next((entry["train_runtime"] for entry in reversed(trainer.state.log_history)
                                         if "train_runtime" in entry), None),
                  "distillation": vars(config), "log_history": trainer.state.log_history, **(extra_record or {})}
        write_json(os.path.join(staging, DISTILL_RECORD), record)
        remove_output(out)
        os.replace(staging, out)
    trainer.accelerator.wait_for_everyone()
    return trainer.model, trainer.state.log_history


def distilled_state(out: str, teacher_fingerprint: str, student_fingerprint: str) -> str | None:
    if not has_weights(out):
        return "missing"
    record = read_json(os.path.join(out, DISTILL_RECORD))
    if record is None:
        return f"no {DISTILL_RECORD}"
    if record.get("teacher_fingerprint") != teacher_fingerprint:
        return "distilled from another teacher"
    if record.get("student_fingerprint_before") != student_fingerprint:
        return "distilled from another pruned student"
    return None
