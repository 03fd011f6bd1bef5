"""The frozen teacher, run cheaper than the student.

Distillation needs only the teacher's hidden states (the fused loss multiplies them by the
teacher's LM-head weight itself), under no_grad, so its blocks can run in a lower precision
than the student trains in. ``prepare_teacher(teacher, precision)`` returns the model to run:

- "float32": float32 blocks. A float32 teacher is used as it is (today's behaviour, no copy);
  one in another dtype is upcast in a copy.
- "bfloat16": a copy whose weights are bfloat16. On CPU only where bfloat16 is native
  (AVX512-BF16 or AMX, ``cpu_has_bf16``); elsewhere emulated bfloat16 is slower than float32, so
  it falls back to the teacher as given, with a one-line notice. On CUDA where
  ``torch.cuda.is_bf16_supported()``.
- "int8": a copy whose ``nn.Linear`` layers but the LM head (the blocks' projections) are
  dynamically quantized (``torch.ao.quantization.quantize_dynamic``, int8 weights per output
  channel, activations quantized per tensor at run time); embeddings, norms and the LM head keep their dtype and
  are shared with the caller's model, not copied. CPU only (the x86/fbgemm engine); on CUDA
  it falls back to "bfloat16", elsewhere to the teacher as given, with a notice.
- "auto" (the default here, in ``distill_stage`` and ``slimlm distill``; ``DistillationConfig``'s
  is None, the teacher as given): "bfloat16" for a float32 teacher on a CPU with native bfloat16,
  otherwise the teacher as given (on CUDA its loaded dtype is the user's choice; a CPU without
  native bfloat16 runs float32). Never "int8": on SmolLM2-135M it raised held-out perplexity
  20.1 → 78 and the KL from the float32 teacher to 1.4 nats/token, while bfloat16 cost 0.0008
  (BENCHMARKS.md).

The names are the dtype table's (``slimlm.models.DTYPE_NAMES``) with "auto" and "int8" (a
quantization, not a dtype); an old spelling ("bf16") is refused, naming the new one.

The LM head the loss uses is not touched: ``DistillationTrainer`` takes it from the caller's
teacher, so the KD targets are the exact head applied to the cheaper hidden states (for a
float32 teacher the logits stay float32); a copy returns its ``hidden_states`` in the caller's
dtype to match it. A teacher sharded by FSDP or spread by ``device_map`` runs as given
(with a notice when ``precision`` asked for bfloat16 or int8).
"""
from __future__ import annotations

import copy
import warnings

import torch

from slimlm.distill.training import PRECISION_DTYPES, check_precision, cpu_has_bf16
from slimlm.models import DTYPES

TEACHER_PRECISIONS = ("auto", *PRECISION_DTYPES, "int8")


def check_teacher_precision(precision) -> str:
    """``precision`` if it is one of ``TEACHER_PRECISIONS``, else an error naming the option."""
    return check_precision("teacher_precision", precision, TEACHER_PRECISIONS)


def int8_engine_available() -> bool:
    """Whether torch has a CPU engine for dynamically quantized Linear layers (x86 or fbgemm)."""
    engines = torch.backends.quantized.supported_engines
    return "x86" in engines or "fbgemm" in engines


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _runs_as_given(model) -> str | None:
    """Why ``model`` cannot be copied into another precision here (sharded, spread), or None."""
    if getattr(model, "hf_device_map", None) is not None:
        return "it is spread over devices (device_map)"
    from slimlm.distill.lm_heads import is_dtensor

    if any(is_dtensor(p) for p in model.parameters()) or type(model).__name__ == "FullyShardedDataParallel":
        return "it is sharded by FSDP"
    return None


def resolve_teacher_precision(teacher, precision: str = "auto", log=print) -> str:
    """The precision ``prepare_teacher`` gives ``teacher`` on its current device: "float32",
    "bfloat16", "int8" or "as-given" (no change). A request the device cannot serve is logged in one line
    and falls back as the module docstring says."""
    check_teacher_precision(precision)
    device = _device(teacher)
    reason = _runs_as_given(teacher)
    if reason is not None:
        if precision not in ("auto", "float32"):
            log(f"[distill] teacher_precision={precision!r} ignored: the teacher runs as given, as {reason}")
        return "as-given"
    if precision == "auto":
        native = device.type == "cpu" and cpu_has_bf16()
        return "bfloat16" if native and _dtype(teacher) == torch.float32 else "as-given"
    if precision == "int8" and device.type != "cpu":
        fallback = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "as-given"
        log(f"[distill] teacher_precision='int8' needs a CPU (dynamic quantization has no {device.type} kernels); "
            f"using {fallback}")
        return fallback
    if precision == "int8" and not int8_engine_available():
        log("[distill] teacher_precision='int8' needs torch's x86/fbgemm quantized engine, absent here; "
            "the teacher runs as given")
        return "as-given"
    if precision == "bfloat16":
        native = cpu_has_bf16() if device.type == "cpu" else device.type == "cuda" and torch.cuda.is_bf16_supported()
        if not native:
            needed = "AVX512-BF16 or AMX" if device.type == "cpu" else device.type
            log(f"[distill] teacher_precision='bfloat16' needs native bfloat16 ({needed}), "
                "absent here: emulated bfloat16 is slower than float32; the teacher runs as given")
            return "as-given"
    return precision


def prepare_teacher(teacher, precision: str = "auto", log=print):
    """The teacher to run for ``precision`` (``TEACHER_PRECISIONS``; see the module docstring),
    on the device ``teacher`` is on: ``teacher`` itself for "as-given" and for "float32" when it is
    already float32, else a copy; the caller's model is never changed (an "int8" copy shares
    its embeddings and norms, which nothing modifies). Call it after moving the teacher to its
    device. A copy is in eval mode with no parameter requiring grad; ``teacher`` itself is
    returned as it is."""
    resolved = resolve_teacher_precision(teacher, precision, log)
    if resolved == "as-given" or (resolved == "float32" and _dtype(teacher) == torch.float32):
        return teacher
    if resolved in PRECISION_DTYPES:
        dtype = DTYPES[resolved]
        # Cast parameters only: buffers such as the rotary frequencies stay float32, as
        # transformers keeps them. Tied weights map to one new parameter through the memo.
        memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in teacher.parameters()}
        prepared = copy.deepcopy(teacher, memo)
    else:
        prepared = _quantized_copy(teacher)
    prepared.register_forward_hook(_hidden_states_in(_dtype(teacher)))
    return prepared.eval().requires_grad_(False)


def _hidden_states_in(dtype: torch.dtype):
    """A forward hook giving the output's ``hidden_states`` in ``dtype``: the loss then pairs them
    with the caller's LM head in its own dtype (the fused loss wants one dtype per side)."""
    def hook(module, args, output):
        states = getattr(output, "hidden_states", None)
        if states is not None:
            output.hidden_states = tuple(state.to(dtype) for state in states)
        return output

    return hook


def _quantized_copy(teacher):
    """A copy of ``teacher`` sharing its parameters, whose ``nn.Linear`` layers but the LM head
    (the decoder blocks' projections) are then swapped for dynamically quantized int8 ones;
    the caller's modules keep theirs."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    memo = {id(p): p for p in teacher.parameters()}
    prepared = copy.deepcopy(teacher, memo)
    head = prepared.get_output_embeddings()
    spec = {name: per_channel_dynamic_qconfig for name, module in prepared.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}
    with warnings.catch_warnings():
        # torch 2.13 marks torch.ao.quantization deprecated in favour of torchao (not a dependency).
        warnings.simplefilter("ignore")
        with torch.no_grad():
            quantize_dynamic(prepared, spec, dtype=torch.qint8, inplace=True)
    return prepared
