"""What a distillation run trains with (what it trains on: ``slimlm.distill.items``):
``TrainingArguments`` from command-line style flags over
slimlm's defaults (with the student's precision, ``student_precision_flags``), the tokens one
optimizer step sees, a wall-time cap and a learning-rate schedule fitted to it."""
from __future__ import annotations

import math
import os
import time

import torch

from slimlm.errors import InputError
from slimlm.models import DTYPE_NAMES, unknown_value
from slimlm.options import OptionError


def tokens_per_step(args, seq_len: int) -> int:
    """Tokens one optimizer step trains on: batch · accumulation · world size · seq_len."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * seq_len


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); elsewhere it is emulated.
    ``SLIMLM_CPU_ISA=avx2`` or ``scalar`` (the C++ kernels' forced variant) answers False too: a CPU
    without AVX-512 has neither, so one machine can run the decisions of a machine without them."""
    if os.environ.get("SLIMLM_CPU_ISA", "") in ("avx2", "scalar"):
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# The dtypes the distillation runs the teacher's forward or trains the student in, by the dtype
# table's names; float16 has no path here (a --fp16 flag of the user's still trains the student in it).
PRECISION_DTYPES = tuple(name for name in DTYPE_NAMES if name != "float16")
STUDENT_PRECISIONS = ("auto", *PRECISION_DTYPES)


def check_precision(name: str, precision, known) -> str:
    """``precision`` if it is one of ``known``, else an ``OptionError`` (a ValueError) naming
    option ``name`` and the choices, and the new name of an old spelling ("bf16 is now bfloat16")."""
    if precision not in known:
        raise OptionError(name, unknown_value(precision, known))
    return precision


def check_student_precision(precision) -> str:
    """``precision`` if it is one of ``STUDENT_PRECISIONS``, else an error naming the option."""
    return check_precision("student_precision", precision, STUDENT_PRECISIONS)


def _flag_value(flags, name: str):
    """The value ``flags`` (command-line style) give ``name`` (the last one wins), "true" for a bare
    flag, None when absent."""
    value = None
    for i, flag in enumerate(flags):
        key, sep, rest = flag.partition("=")
        if key == name:
            following = flags[i + 1] if i + 1 < len(flags) else None
            value = rest if sep else following if following is not None and not following.startswith("--") else "true"
    return value


def student_precision_flags(precision: str = "auto", flags=(), log=print) -> list[str]:
    """``flags`` (``TrainingArguments`` flags, command-line style) with the student's mixed
    precision for ``precision`` added: "bfloat16" is ``--bf16 true`` (float32 master weights and
    optimizer; the student's forward under bfloat16 autocast and the loss's LM-head GEMMs with
    bfloat16 operands; softmax and KL in float32) where bfloat16 is native — a CPU with
    AVX512-BF16 or AMX (``cpu_has_bf16``), a CUDA device that supports it — and float32
    elsewhere, said in one line (emulated bfloat16 is slower than float32); "auto" is the same
    without the line; "float32" adds nothing. Flags that set ``--bf16`` or ``--fp16`` themselves
    are the user's choice and win."""
    check_student_precision(precision)
    flags = list(flags)
    if precision == "float32" or _flag_value(flags, "--bf16") is not None or _flag_value(flags, "--fp16") is not None:
        return flags
    on_cpu = not torch.cuda.is_available() or str(_flag_value(flags, "--use_cpu")).lower() in ("true", "1", "yes")
    native = cpu_has_bf16() if on_cpu else torch.cuda.is_bf16_supported()
    if native:
        return flags + ["--bf16", "true"]
    if precision == "bfloat16":
        needed = "AVX512-BF16 or AMX" if on_cpu else "a CUDA device with bfloat16"
        log(f"[distill] student_precision='bfloat16' needs native bfloat16 ({needed}), absent here: "
            "emulated bfloat16 is slower than float32; the student trains in float32")
    return flags


def training_arguments(flags=(), *, output_dir: str, batch_size: int = 8, learning_rate: float = 1e-4,
                       seed: int = 0):
    """``TrainingArguments`` from command-line style ``flags``, over slimlm's defaults (cosine
    schedule, 5% warmup, a log every step, a checkpoint every 50 steps, no reporting);
    on a machine without CUDA, ``--use_cpu`` (and gloo under torchrun). InputError for a flag
    TrainingArguments does not know, for one naming a path slimlm decides (``PATH_FLAGS``: the
    checkpoints follow the output, which passes the output checks) and for values that make
    the run empty or invalid (``check_training_arguments``), before anything is written."""
    from transformers import HfArgumentParser, TrainingArguments

    for flag in flags:
        key = str(flag).partition("=")[0]
        if key in PATH_FLAGS:
            raise InputError(f"{key} cannot be passed through: {PATH_FLAGS[key]}")

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
    check_training_arguments(args)
    return args


# Pass-through flags that name where the Trainer writes: slimlm decides those places from the
# output, so that they go through the same checks (never an input, never a foreign folder).
PATH_FLAGS = {
    "--output_dir": "the checkpoints go to <out>.checkpoints (choose --out, or the recipe's out)",
    "--logging_dir": "the Trainer's logs go beside the checkpoints (choose --out, or the recipe's out)",
    "--hub_model_id": "slimlm writes local folders only",
    "--push_to_hub": "slimlm writes local folders only",
}


def check_training_arguments(args) -> None:
    """InputError for ``TrainingArguments`` values that would train nothing or are invalid,
    each naming its flag: counts below 1, a step budget of 0, no epochs, non-finite or
    negative rates."""
    positive = ("gradient_accumulation_steps", "per_device_train_batch_size", "logging_steps", "save_steps")
    for name in positive:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            raise InputError(f"--{name} must be > 0, got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise InputError(f"--max_steps must be a positive number of steps (or -1 for epochs), got {args.max_steps}")
    if args.max_steps == -1 and not (args.num_train_epochs > 0 and math.isfinite(args.num_train_epochs)):
        raise InputError(f"--num_train_epochs must be > 0 and finite, got {args.num_train_epochs}")
    for name in ("learning_rate", "weight_decay", "max_grad_norm", "warmup_steps", "adam_epsilon"):
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise InputError(f"--{name} must be >= 0 and finite, got {value}")


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


def fit_schedule_callback(seconds: float, *, probe_steps: int = 4, margin: float = 0.97, log=print):
    """A TrainerCallback that fits the run to ``seconds`` of wall time: the learning-rate
    schedule (its warmup and decay) ends at the step the time allows instead of ``max_steps``,
    which stays the upper bound. After ``probe_steps`` steps past the first (whose warm-up it
    leaves out) it plans ``steps done + margin · time left / seconds per step`` and sets
    ``state.max_steps`` to it; it plans again every ⌈plan/8⌉ steps with the mean over all steps so far
    (evaluations and checkpoint saves included) until three quarters of the plan, so the
    schedule decays fully on a fast or a slow machine. The plan is kept in the Trainer's state
    (``stateful_callbacks``, saved with every checkpoint): a resumed run keeps it, so it
    continues the same schedule. Under torchrun every rank takes rank 0's plan.

    Works with the schedules ``transformers.get_scheduler`` builds from ``num_training_steps``
    (linear, cosine, polynomial, …; warmup as a fraction of the plan); a constant schedule only
    stops at the plan. Use it with ``time_budget_callback(seconds)`` as the hard stop."""
    import functools

    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")

    def agreed(value: int) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return value
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([value], dtype=torch.long, device=device)
        dist.broadcast(tensor, 0)
        return int(tensor.item())

    class FitScheduleCallback(TrainerCallback, ExportableState):
        def __init__(self):
            self.planned = None
            self.resumed = False

        def state(self) -> dict:
            return {"args": {}, "attributes": {"planned": self.planned}}

        def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
            self.begin, self.first, self.limit, self.scheduler = time.perf_counter(), None, state.max_steps, lr_scheduler
            self.next_plan = None
            stored = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
            if isinstance(stored, list):
                stored = stored[0] if stored else None
            planned = (stored or {}).get("attributes", {}).get("planned")
            if planned:
                self.resumed = True
                self._apply(args, state, int(planned))
                log(f"[distill] resuming the schedule fitted to the time budget: {self.planned} steps")
            return control

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.resumed:
                return control
            if self.first is None:
                self.first = (state.global_step, now)
                return control
            done = state.global_step - self.first[0]
            due = self.planned is None and done >= probe_steps or \
                self.next_plan is not None and state.global_step >= self.next_plan
            if not due or control.should_training_stop:
                return control
            per_step = (now - self.first[1]) / done
            left = max(0.0, seconds - (now - self.begin))
            planned = agreed(max(state.global_step + 1, min(self.limit, state.global_step + int(margin * left / per_step))))
            first = self.planned is None
            self._apply(args, state, planned)
            step = max(1, -(-planned // 8))
            self.next_plan = state.global_step + step if state.global_step + step <= 0.75 * planned else None
            if first:
                log(f"[distill] schedule fitted to {seconds / 60:g} min: {planned} steps of at most {self.limit} "
                    f"({per_step:.2f} s/step measured over {done} steps)")
            return control

        def on_train_end(self, args, state, control, **kwargs):
            if self.planned is not None and not self.resumed:
                log(f"[distill] fitted schedule: {self.planned} steps planned, {state.global_step} trained")
            return control

        def _apply(self, args, state, planned: int) -> None:
            self.planned = planned
            state.max_steps = planned
            scheduler = getattr(self.scheduler, "scheduler", self.scheduler)  # accelerate's wrapper
            lambdas = getattr(scheduler, "lr_lambdas", None)
            if not lambdas:
                return
            refit = []
            for fn in lambdas:
                keywords = getattr(fn, "keywords", None) or {}
                if isinstance(fn, functools.partial) and "num_training_steps" in keywords:
                    keywords = {**keywords, "num_training_steps": planned}
                    if "num_warmup_steps" in keywords:
                        keywords["num_warmup_steps"] = args.get_warmup_steps(planned)
                    fn = functools.partial(fn.func, *fn.args, **keywords)
                refit.append(fn)
            scheduler.lr_lambdas = refit
            # The learning rate of the next step, under the new plan.
            lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, refit)]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs

    return FitScheduleCallback()


def heldout_eval_callback(sets: dict, every: int, *, batch_size: int = 8, log=None):
    """A TrainerCallback that, every ``every`` optimizer steps and after the last, scores the
    student on each held-out ``TokenBlocks`` of ``sets`` ({name: blocks}) and logs
    ``<name>_nll`` and ``<name>_ppl`` into the Trainer's ``log_history`` (so the report draws
    them along the loss curve). The model is put back in training mode afterwards; scoring
    uses no randomness, so it changes nothing about the training. ``log``: a function given one
    line per evaluation."""
    import math as _math

    from transformers import TrainerCallback

    from slimlm.evaluate import perplexity

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"eval steps must be a positive int, got {every!r}")

    class HeldoutEvalCallback(TrainerCallback):
        def _score(self, state, model):
            if model is None or any(e.get("step") == state.global_step and any(k.endswith("_nll") for k in e)
                                    for e in state.log_history):
                return
            training = model.training
            entry = {"step": state.global_step}
            for name, blocks in sets.items():
                nll = perplexity(model, blocks, batch_size=batch_size, progress=False)["nll"]
                entry[f"{name}_nll"] = round(nll, 5)
                entry[f"{name}_ppl"] = round(_math.exp(nll), 4)
            model.train(training)
            state.log_history.append(entry)
            if log is not None and state.is_world_process_zero:
                log(f"[distill] step {state.global_step}: held-out perplexity "
                    + ", ".join(f"{name} {entry[f'{name}_ppl']:.2f}" for name in sets))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 or state.global_step >= state.max_steps or control.should_training_stop:
                self._score(state, model)
            return control

    return HeldoutEvalCallback()
