"""Distillation losses.

Conventions (shared by every loss here):
- P = softmax(teacher / τ), Q = softmax(student / τ), M = βP + (1−β)Q.
- β = 0: forward KL(P‖Q) (Minitron's default); β = 1: reverse KL(Q‖P);
  0 < β < 1: generalised JSD β·KL(P‖M) + (1−β)·KL(Q‖M). This is the TRL/Liger
  convention; note that β → 0 of the JSD is 0, not forward KL, so the endpoints are
  the two KL directions by definition.
- ``scale_by_temperature_sq=True`` multiplies the loss by τ² (Hinton), so gradient
  magnitudes do not shrink as τ grows.
- Rows whose label is ``ignore_index`` count for nothing. ``batchmean`` divides by
  the number of valid rows, or by ``num_items_in_batch`` when given (use the global
  count under gradient accumulation or data parallelism); ``mean`` divides by valid
  rows × vocabulary; ``sum`` adds; ``none`` returns one loss per row (leading shape).
- Losses are returned in fp32 whatever the input dtype.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch

from slimlm import architectures
from slimlm.kernels.kl_div import KLDivFunction

REDUCTIONS = ("batchmean", "sum", "mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_logits(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have a vocabulary dimension, got a 0-dim tensor")
    if tensor.shape[-1] == 0:
        raise ValueError(f"{name} has an empty vocabulary dimension (shape {tuple(tensor.shape)})")


def _check_options(temperature, beta, reduction, num_items_in_batch) -> None:
    if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(beta, numbers.Real) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {beta!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if num_items_in_batch is not None:
        count = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
        if count <= 0:
            raise ValueError(f"num_items_in_batch must be > 0, got {count}")
        if reduction not in ("batchmean", "mean"):
            raise ValueError(f"num_items_in_batch only applies to reduction='batchmean' or 'mean', got {reduction!r}")


def check_labels(labels, leading_shape: torch.Size, device: torch.device) -> None:
    """Labels must be an integer tensor with the logits' leading shape, on their device."""
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(leading_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but the logits are on {device}")


def kl_div_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    scale_by_temperature_sq: bool = True,
) -> torch.Tensor:
    """Fused distillation loss between student and teacher logits of shape (..., V).

    loss_row = τ² · D(P‖Q) with D the forward KL, reverse KL or JSD(β) (module docstring),
    reduced over valid rows. One fused pass per row computes the loss and the student
    gradient (stored in the student's dtype); backward only scales it, so call backward
    once per forward. The teacher gets no gradient. Teacher logits in another float dtype
    are cast to the student's.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        detail = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            detail = f": vocabulary sizes differ (student {student_logits.shape[-1]}, teacher {teacher_logits.shape[-1]})"
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            f"must have the same shape{detail}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits are on {student_logits.device} but teacher_logits on {teacher_logits.device}")
    _check_options(temperature, beta, reduction, num_items_in_batch)
    leading = student_logits.shape[:-1]
    check_labels(labels, leading, student_logits.device)

    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.detach().reshape(-1, vocab).to(student.dtype).contiguous()
    flat_labels = labels.reshape(-1).contiguous() if labels is not None else None
    scale = float(temperature) ** 2 if scale_by_temperature_sq else 1.0

    _, host_norm, norm = _valid_rows_and_norm(
        flat_labels, student.shape[0], ignore_index, reduction, num_items_in_batch, student.device, False
    )
    per_row = vocab if reduction == "mean" else 1
    scale /= host_norm * (per_row if norm is None else 1)
    if norm is not None:
        norm = norm * per_row

    loss = KLDivFunction.apply(
        student, teacher, flat_labels, ignore_index, float(temperature), float(beta), scale, norm,
        reduction != "none", None,
    )
    return loss.reshape(leading) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------
# Fused linear + distillation loss: from hidden states and LM-head weights, never (N, V).
# ---------------------------------------------------------------------------------------

from slimlm.kernels import fused_linear, kl_div  # noqa: E402  (kept with the section that uses them)


def _check_matrix(name: str, tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if dims and tensor.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(tensor.shape)}")


def _check_head(side: str, hidden, weight, bias) -> None:
    """One side's hidden (..., H), weight (V, H), bias (V,): shapes, dtypes, devices."""
    _check_matrix(f"{side}_hidden", hidden, 0)
    _check_matrix(f"{side}_weight", weight, 2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{side}_hidden's last dimension ({hidden.shape[-1] if hidden.dim() else 'none'}) must equal "
            f"{side}_weight's hidden size ({weight.shape[1]}; weight shape {tuple(weight.shape)} is (vocab, hidden))"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight has an empty vocabulary dimension (shape {tuple(weight.shape)})")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}; they must match")
    if hidden.device != weight.device:
        raise ValueError(f"{side}_hidden is on {hidden.device} but {side}_weight on {weight.device}")
    if bias is not None:
        _check_matrix(f"{side}_bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{side}_bias has {bias.shape[0]} entries but {side}_weight has {weight.shape[0]} vocabulary rows")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"{side}_bias ({bias.dtype}, {bias.device}) must match {side}_weight ({weight.dtype}, {weight.device})")


def _check_head_options(side: str, logit_scale, softcap) -> None:
    if not isinstance(logit_scale, numbers.Real) or not math.isfinite(logit_scale) or logit_scale == 0:
        raise ValueError(f"{side}_logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(f"{side}_softcap must be None or a finite number > 0, got {softcap!r}")


def _valid_rows_and_norm(flat_labels, num_rows, ignore_index, reduction, num_items_in_batch, device, drop_ignored_rows):
    """(rows to compute or None for all, host divisor, device divisor or None).

    On CPU the valid count is free, so ignored rows are dropped before any matmul and the
    reduction's divisor is folded into the kernel scales. On CUDA counting would be a host
    sync, so by default every row runs (the kernel zeroes ignored ones) and the divisor is
    a 0-dim tensor divided in backward; ``drop_ignored_rows=True`` pays one sync to skip them.
    """
    # Inside torch.compile a count read from labels is data-dependent: keep it on the device.
    host_count = device.type == "cpu" and not torch.compiler.is_compiling()
    drop = host_count if drop_ignored_rows is None else bool(drop_ignored_rows)
    rows = None
    valid = flat_labels != ignore_index if flat_labels is not None else None
    if drop and valid is not None:
        candidate = torch.nonzero(valid).squeeze(1)
        if candidate.numel() != num_rows:
            rows = candidate
    if reduction not in ("batchmean", "mean"):
        return rows, 1.0, None
    if num_items_in_batch is not None:
        count = num_items_in_batch
    elif valid is not None:
        count = rows.numel() if rows is not None else valid.sum()
    else:
        count = num_rows
    if host_count or not isinstance(count, torch.Tensor):
        return rows, max(float(count), 1.0), None
    return rows, 1.0, torch.as_tensor(count, device=device, dtype=torch.float32).clamp(min=1.0)


def _check_ce_targets(flat_labels, ignore_index, vocab, ce_weight) -> None:
    if ce_weight == 0:
        return
    if flat_labels is None:
        raise ValueError("ce_weight > 0 needs labels (the next-token targets of each row)")
    # A range check needs the values on the host; free on CPU, a sync on CUDA where an
    # out-of-range target would instead trip the gather's device assertion.
    if flat_labels.device.type == "cpu" and not torch.compiler.is_compiling():
        targets = flat_labels[flat_labels != ignore_index]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(
                f"labels must lie in [0, {vocab}) (the vocabulary of the weights) or equal ignore_index "
                f"{ignore_index}; got values in [{int(targets.min())}, {int(targets.max())}]"
            )


def fused_linear_kl_div_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    scale_by_temperature_sq: bool = True,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    drop_ignored_rows: bool | None = None,
    backend: str | None = None,
    gemm_dtype: torch.dtype | None = None,
    return_terms: bool = False,
) -> torch.Tensor | dict:
    """``kl_div_loss`` of logits that are never materialised, plus optional next-token CE.

    With s = softcap((student_hidden @ student_weightᵀ + student_bias) · student_logit_scale)
    and t likewise for the teacher (softcap(z) = cap · tanh(z / cap); None: no cap), each valid
    row contributes  kd_weight · τ² · D(P‖Q) + ce_weight · (logsumexp(s) − s[label])
    (D, τ, β and the τ² switch as in ``kl_div_loss``; CE at temperature 1 on the capped logits).
    Reductions: ``batchmean`` and ``mean`` divide by the valid-row count (or ``num_items_in_batch``);
    ``mean`` also divides the KD term by V, as ``kl_div_loss`` does, but not the CE term (the
    usual CE mean); ``sum`` adds; ``none`` returns the per-row total (leading shape).

    The hidden states are (..., H_s) and (..., H_t) with the same leading shape (the teacher's
    width may differ); weights are (V, H). Logits are formed in row chunks of ``chunk_size``
    rows (None: picked from a memory budget), in fp32 whatever the input dtype; the gradients
    of student_hidden, student_weight and student_bias are computed during the forward (the
    weight's and bias's accumulated in fp32) and only scaled by backward, so call backward
    once per forward. The teacher gets no gradient. ``backend`` picks the per-chunk KL kernel.
    ``gemm_dtype``: operand dtype of the head GEMMs (both heads, forward and gradients);
    None follows autocast when it is on at the call (bf16 under a bf16 autocast), else keeps
    them exact. Ambient autocast never changes them otherwise; softmax and KL stay fp32.
    ``return_terms=True`` returns ``{"loss": total, "kd": KD, "ce": CE}``: the unweighted terms,
    reduced like the total and detached (for logging), "kd" only when kd_weight > 0 and "ce"
    only when ce_weight > 0.
    """
    _check_head("student", student_hidden, student_weight, student_bias)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student_weight has {student_weight.shape[0]} rows, teacher_weight "
            f"{teacher_weight.shape[0]} (pad the smaller with -inf logits or trim when only padding differs)"
        )
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden {tuple(teacher_hidden.shape)} "
            "must have the same leading (token) shape"
        )
    if student_hidden.device != teacher_hidden.device:
        raise ValueError(f"student_hidden is on {student_hidden.device} but teacher_hidden on {teacher_hidden.device}")
    _check_options(temperature, beta, reduction, num_items_in_batch)
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    _check_head_options("student", student_logit_scale, student_softcap)
    _check_head_options("teacher", teacher_logit_scale, teacher_softcap)
    leading = student_hidden.shape[:-1]
    check_labels(labels, leading, student_hidden.device)

    vocab = student_weight.shape[0]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    _check_ce_targets(flat_labels, ignore_index, vocab, ce_weight)
    rows, host_norm, norm = _valid_rows_and_norm(
        flat_labels, hidden.shape[0], ignore_index, reduction, num_items_in_batch, hidden.device, drop_ignored_rows
    )
    kd_scale = kd_weight * (float(temperature) ** 2 if scale_by_temperature_sq else 1.0) / host_norm
    if reduction == "mean":
        kd_scale /= vocab
    ce_scale = ce_weight / host_norm
    gemm_dtype = fused_linear.resolve_gemm_dtype(gemm_dtype, hidden.device)
    teacher_head = fused_linear.LinearHead(
        teacher_weight.detach(), teacher_bias.detach() if teacher_bias is not None else None,
        float(teacher_logit_scale), teacher_softcap, gemm_dtype,
    )
    # With dropped rows every chunk row is valid; otherwise the kernel masks by label.
    pass_labels = flat_labels if rows is None else None
    term_rows = {}
    if return_terms:
        for name, weight in (("kd", kd_weight), ("ce", ce_weight)):
            if weight:
                term_rows[name] = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)

    def keep_term(name, index, values, weight):
        if name in term_rows:
            if isinstance(index, slice):
                term_rows[name][index] = values.detach() / weight
            else:
                term_rows[name].index_copy_(0, index, values.detach().float() / weight)

    def chunk_loss(student_logits, index, compute_grad):
        teacher_chunk = teacher_rows[index] if isinstance(index, slice) else teacher_rows.index_select(0, index)
        teacher_logits = teacher_head.logits(teacher_head.operand(teacher_chunk)).to(student_logits.dtype)
        chunk_labels = pass_labels[index] if pass_labels is not None else None
        if kd_scale != 0:
            loss_rows, dlogits = kl_div.kl_div_fwd(
                student_logits, teacher_logits, chunk_labels, ignore_index, float(temperature), float(beta),
                kd_scale, compute_grad, backend,
            )
        else:
            loss_rows = student_logits.new_zeros(student_logits.shape[0])
            dlogits = torch.zeros_like(student_logits) if compute_grad else None
        del teacher_logits
        dlogits = dlogits if compute_grad else None
        keep_term("kd", index, loss_rows, kd_weight)
        if ce_weight:
            targets = flat_labels[index] if isinstance(index, slice) else flat_labels.index_select(0, index)
            valid = (targets != ignore_index) if rows is None else None
            ce_rows = fused_linear.cross_entropy_into(student_logits, targets, valid, ce_scale, dlogits)
            keep_term("ce", index, ce_rows, ce_weight)
            loss_rows = loss_rows + ce_rows
        return loss_rows, dlogits

    loss = _run_fused(hidden, student_weight, student_bias, float(student_logit_scale), student_softcap,
                      chunk_loss, rows, chunk_size, norm, reduction, leading, gemm_dtype)
    if not return_terms:
        return loss
    terms = {"loss": loss}
    for name, values in term_rows.items():
        if reduction == "none":
            terms[name] = values.reshape(leading)
        else:
            total = values.sum()
            terms[name] = total / norm if norm is not None else total
    return terms


def _run_fused(hidden, weight, bias, logit_scale, softcap, chunk_loss, rows, chunk_size, norm, reduction, leading,
               gemm_dtype=None):
    """Wires a chunk loss through ``FusedLinearLossFunction`` for the student side.

    ``gemm_dtype`` is already resolved (``fused_linear.resolve_gemm_dtype``): autocast is off
    inside, so the GEMMs run exactly in the precision chosen here, in forward and backward.
    """

    def run(hidden_, weight_, bias_, need_hidden, need_weight, need_bias, row_weights):
        with torch.autocast(hidden_.device.type, enabled=False):
            head = fused_linear.LinearHead(weight_.detach(), bias_.detach() if bias_ is not None else None,
                                           logit_scale, softcap, gemm_dtype)
            return fused_linear.chunked_linear_loss(
                hidden_.detach(), head, chunk_loss, rows=rows, chunk_size=chunk_size, need_grad_hidden=need_hidden,
                need_grad_weight=need_weight, need_grad_bias=need_bias, row_weights=row_weights,
            )

    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if wants_grad:
        loss = fused_linear.FusedLinearLossFunction.apply(hidden, weight, bias, run, norm, reduction != "none")
    else:
        # No graph (no_grad, evaluation): the loss alone, without the gradient work of the forward.
        loss = run(hidden, weight, bias, False, False, False, None).loss_rows
        if reduction != "none":
            loss = loss.sum() / norm if norm is not None else loss.sum()
    return loss.reshape(leading) if reduction == "none" else loss


class FusedLinearKLDivLoss(torch.nn.Module):
    """Module form of ``fused_linear_kl_div_loss``: options at construction, tensors per call."""

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - _FUSED_OPTIONS
        if unknown:
            raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {sorted(_FUSED_OPTIONS)}")
        self.options = options

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, *, student_bias=None,
                teacher_bias=None, labels=None, num_items_in_batch=None):
        return fused_linear_kl_div_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, labels=labels, num_items_in_batch=num_items_in_batch, **self.options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in sorted(self.options.items()))


_FUSED_OPTIONS = {
    "ignore_index", "temperature", "beta", "reduction", "chunk_size", "ce_weight", "kd_weight",
    "scale_by_temperature_sq", "student_logit_scale", "teacher_logit_scale", "student_softcap",
    "teacher_softcap", "drop_ignored_rows", "backend", "gemm_dtype", "return_terms",
}


def lm_head_spec(model) -> dict:
    """How a Hugging Face causal LM turns its last hidden state into logits: the fields of
    its ``LMHead`` (``slimlm.architectures.lm_head``) as a dict — ``weight`` (V, H) (the input
    embedding itself when embeddings are tied), ``bias`` (or None), ``logit_scale`` and ``softcap``."""
    head = architectures.lm_head(model)
    return {field.name: getattr(head, field.name) for field in dataclasses.fields(head)}


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The causal LM's final (normed) hidden states, without computing its logits."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
    return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def causal_lm_kl_div_loss(
    student,
    teacher,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    **options,
) -> torch.Tensor:
    """``fused_linear_kl_div_loss`` between two Hugging Face causal LMs on ``input_ids`` (B, T).

    Runs both decoders (the teacher under ``no_grad``) to their last hidden states and
    applies each model's LM head as ``lm_head_spec`` describes (tied embeddings receive the
    gradient through the shared parameter). Labels follow Hugging Face's convention: unshifted,
    ``labels[:, t]`` is the token at t (default: ``input_ids``, padding from ``attention_mask``
    ignored); position t's logits are matched on ``labels[:, t + 1]``. ``options`` are those of
    ``fused_linear_kl_div_loss`` (temperature, beta, ce_weight, reduction, ...).
    """
    student_head = lm_head_spec(student)
    teacher_head = lm_head_spec(teacher)
    if student_head["weight"].shape[0] != teacher_head["weight"].shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: the student's lm_head has {student_head['weight'].shape[0]} rows, "
            f"the teacher's {teacher_head['weight'].shape[0]}"
        )
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    student_hidden = last_hidden_state(student, input_ids, attention_mask)
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, input_ids, attention_mask)
    return fused_linear_kl_div_loss(
        student_hidden[:, :-1], student_head["weight"], teacher_hidden[:, :-1], teacher_head["weight"],
        student_bias=student_head["bias"], teacher_bias=teacher_head["bias"], labels=labels[:, 1:],
        ignore_index=ignore_index, student_logit_scale=student_head["logit_scale"],
        teacher_logit_scale=teacher_head["logit_scale"], student_softcap=student_head["softcap"],
        teacher_softcap=teacher_head["softcap"], **options,
    )


# ---------------------------------------------------------------------------------------
# Hidden-state (intermediate) distillation.
# ---------------------------------------------------------------------------------------

HIDDEN_LOSS_KINDS = ("cosine", "mse")


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "cosine",
    projection: torch.nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between student and teacher hidden states (..., H_s) and (..., H_t), in fp32.

    With h = projection(student_hidden) (identity when None; needed when H_s != H_t) and
    t = teacher_hidden (no gradient): ``cosine`` = mean over tokens of 1 − cos(h, t);
    ``mse`` = mean over tokens and features of (h − t)². ``mask`` (leading shape, bool or
    0/1) keeps only the tokens that count (e.g. the attention mask); none counting gives 0.
    """
    if kind not in HIDDEN_LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSS_KINDS)}, got {kind!r}")
    _check_matrix("student_hidden", student_hidden, 0)
    _check_matrix("teacher_hidden", teacher_hidden, 0)
    if projection is not None:
        weight = getattr(projection, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype != student_hidden.dtype:
            student_hidden = student_hidden.to(weight.dtype)
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        hint = "" if projection is not None else " (pass a projection, e.g. HiddenStateProjection, when widths differ)"
        raise ValueError(
            f"student_hidden{' after projection' if projection is not None else ''} {tuple(student_hidden.shape)} "
            f"and teacher_hidden {tuple(teacher_hidden.shape)} must have the same shape{hint}"
        )
    student = student_hidden.float()
    teacher = teacher_hidden.detach().float()
    if kind == "cosine":
        per_token = 1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        per_token = (student - teacher).square().mean(-1)
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the hidden states' leading shape {tuple(per_token.shape)}")
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


class HiddenStateProjection(torch.nn.Linear):
    """Learnable student-width → teacher-width map for a hidden-state loss.

    Initialised to copy the student's channels onto the teacher channels they came from:
    ``kept_channels[i]`` is the teacher channel that student channel i kept after width
    pruning (default 0..H_s−1), so the loss starts from the pruned model's own alignment.
    """

    def __init__(self, student_width: int, teacher_width: int, kept_channels=None, dtype=None, device=None):
        super().__init__(student_width, teacher_width, bias=False, dtype=dtype, device=device)
        kept = torch.arange(min(student_width, teacher_width)) if kept_channels is None else torch.as_tensor(kept_channels)
        if kept.dim() != 1 or kept.numel() > student_width or (kept.numel() and (kept.min() < 0 or kept.max() >= teacher_width)):
            raise ValueError(
                f"kept_channels must be at most {student_width} teacher channel indices in [0, {teacher_width}), "
                f"got shape {tuple(kept.shape)}"
            )
        with torch.no_grad():
            self.weight.zero_()
            self.weight[kept.long(), torch.arange(kept.numel())] = 1.0


def depth_layer_map(num_student_layers: int, num_teacher_layers: int, kept_layers=None) -> dict[int, int]:
    """Student → teacher indices into Hugging Face ``hidden_states`` tuples (0: embeddings, i: after layer i).

    ``kept_layers``: the teacher layers (0-based) the depth-pruned student kept, in order;
    student layer i is teacher layer kept_layers[i], so their outputs align. Without it the
    student's layers are spread evenly over the teacher's (last onto last).
    """
    if kept_layers is not None:
        kept = list(kept_layers)
        if len(kept) != num_student_layers or sorted(set(kept)) != kept or (kept and (kept[0] < 0 or kept[-1] >= num_teacher_layers)):
            raise ValueError(
                f"kept_layers must be {num_student_layers} increasing teacher layer indices in [0, {num_teacher_layers}), got {kept}"
            )
        return {i + 1: layer + 1 for i, layer in enumerate(kept)}
    if not 0 < num_student_layers <= num_teacher_layers:
        raise ValueError(f"need 0 < student layers ({num_student_layers}) <= teacher layers ({num_teacher_layers})")
    return {i: round(i * num_teacher_layers / num_student_layers) for i in range(1, num_student_layers + 1)}


class HiddenStateDistiller(torch.nn.Module):
    """Hidden-state loss over mapped layers, with one learnable projection per layer when widths differ.

    ``layer_map`` maps student to teacher indices into the models' ``hidden_states`` tuples
    (``output_hidden_states=True``; see ``depth_layer_map``). The loss is the mean over mapped
    layers of ``hidden_state_loss``.
    """

    def __init__(self, student_width: int, teacher_width: int, layer_map: dict[int, int], *, kind: str = "cosine",
                 kept_channels=None, dtype=None, device=None):
        super().__init__()
        if kind not in HIDDEN_LOSS_KINDS:
            raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSS_KINDS)}, got {kind!r}")
        if not layer_map:
            raise ValueError("layer_map must map at least one student layer to a teacher layer")
        self.kind = kind
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        needs_projection = student_width != teacher_width or kept_channels is not None
        self.projections = torch.nn.ModuleDict(
            {
                str(student_layer): HiddenStateProjection(student_width, teacher_width, kept_channels, dtype, device)
                for student_layer in self.layer_map
            }
            if needs_projection
            else {}
        )

    def forward(self, student_hidden_states, teacher_hidden_states, mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for student_layer, teacher_layer in self.layer_map.items():
            if student_layer >= len(student_hidden_states) or teacher_layer >= len(teacher_hidden_states):
                raise ValueError(
                    f"layer_map {student_layer} → {teacher_layer} is out of range: the student gave "
                    f"{len(student_hidden_states)} hidden states, the teacher {len(teacher_hidden_states)}"
                )
            projection = self.projections[str(student_layer)] if self.projections else None
            losses.append(hidden_state_loss(student_hidden_states[student_layer], teacher_hidden_states[teacher_layer],
                                             kind=self.kind, projection=projection, mask=mask))
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------
# Sparse (top-k) teacher.
# ---------------------------------------------------------------------------------------

from slimlm.kernels import topk_kl  # noqa: E402  (kept with the section that uses it)

TOPK_TAILS = ("bucket", "renormalize")


def _check_topk(logprobs, indices, leading: torch.Size, vocab: int, device: torch.device) -> None:
    if not isinstance(logprobs, torch.Tensor) or logprobs.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"teacher_topk_logprobs must be a float tensor, got {getattr(logprobs, 'dtype', type(logprobs))}")
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"teacher_topk_indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
    if logprobs.shape != indices.shape:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(logprobs.shape)} and teacher_topk_indices {tuple(indices.shape)} must have the same shape"
        )
    if logprobs.dim() < 1 or logprobs.shape[:-1] != leading:
        raise ValueError(
            f"teacher_topk_logprobs {tuple(logprobs.shape)} must be (*{tuple(leading)}, k): the student's leading shape, then k"
        )
    k = logprobs.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size must be in [1, {vocab}] (the student's vocabulary size), got k={k}")
    if logprobs.device != device or indices.device != device:
        raise ValueError(f"the top-k teacher ({logprobs.device}, {indices.device}) must be on the student's device {device}")
    if indices.numel() and not torch.compiler.is_compiling():
        # One reduction and a host read (a sync on CUDA). Inside torch.compile a host read
        # would break the graph; there the kernels' own bounds checks report instead.
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= vocab:
            raise ValueError(
                f"teacher_topk_indices must lie in [0, {vocab}) for a student vocabulary of {vocab}, "
                f"got indices in [{low}, {high}] (teacher vocabulary larger than the student's?)"
            )


def topk_kl_div_loss(
    student: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    student_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    scale_by_temperature_sq: bool = True,
    chunk_size: int | None = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    student_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    drop_ignored_rows: bool | None = None,
    backend: str | None = None,
    gemm_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Distillation from a sparse teacher: its k most likely tokens per position (k = 8 to 128).

    ``teacher_topk_logprobs`` (..., k) are log softmax(teacher / τ) at ``teacher_topk_indices``
    (..., k) (distinct per row, in [0, V)), as written by ``slimlm.distill.cache_teacher_topk``
    at the same τ. The student is Q = softmax(s / τ) over the FULL vocabulary. The teacher's
    missing mass is handled by ``tail``:

    - ``"bucket"``: both distributions get one extra outcome, "any token outside the teacher's
      top-k": P_tail = 1 − Σ_k P_i, Q_tail = 1 − Σ_k Q_i (each clamped at the fp32 tiny
      number); D(P‖Q) of ``kl_div_loss`` (forward KL / reverse KL / JSD(β)) is taken over these
      k + 1 outcomes. Exact when k covers the whole support; the student is pushed to put the
      teacher's tail mass outside the top-k without being told where.
    - ``"renormalize"``: the teacher's top-k is renormalised to sum to 1 (its tail is dropped)
      and the loss is Σ_k P'_i (log P'_i − log Q_i) with the student's full-vocab log-probs, a
      forward KL (β must be 0) whose minimum puts all of the student's mass on the top-k.

    ``student`` is logits (..., V), or hidden states (..., H) when ``student_weight`` (V, H) is
    given: then logits are formed in fp32 row chunks and never kept, exactly as in
    ``fused_linear_kl_div_loss`` (bias, logit scale, soft-cap, ``ce_weight`` next-token CE on
    ``labels``, gradients of hidden/weight/bias computed in the forward, ``gemm_dtype``). Reductions, τ²
    scaling, ``ignore_index`` and ``num_items_in_batch`` follow ``kl_div_loss`` (``mean``
    divides the KD term by V). Indices are range-checked (one host read; a sync on CUDA).
    """
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    _check_options(temperature, beta, reduction, num_items_in_batch)
    if tail == "renormalize" and beta != 0.0:
        raise ValueError(f"tail='renormalize' is a forward KL on the renormalised top-k: beta must be 0, got {beta!r}")
    for name, value in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    fused = student_weight is not None
    if fused:
        _check_head("student", student, student_weight, student_bias)
        _check_head_options("student", student_logit_scale, student_softcap)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        vocab = student_weight.shape[0]
    else:
        _check_logits("student", student)
        if student_bias is not None or ce_weight:
            raise ValueError("student_bias and ce_weight apply to the fused form (pass student_weight with hidden states)")
        vocab = student.shape[-1]
    leading = student.shape[:-1]
    _check_topk(teacher_topk_logprobs, teacher_topk_indices, leading, vocab, student.device)
    check_labels(labels, leading, student.device)

    k = teacher_topk_logprobs.shape[-1]
    logprobs = teacher_topk_logprobs.detach().reshape(-1, k).to(torch.float32).contiguous()
    indices = teacher_topk_indices.reshape(-1, k).to(torch.int64).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    renormalize = tail == "renormalize"
    kd_scale = kd_weight * (float(temperature) ** 2 if scale_by_temperature_sq else 1.0)

    if not fused:
        logits = student.reshape(-1, vocab).contiguous()
        rows, host_norm, norm = _valid_rows_and_norm(flat_labels, logits.shape[0], ignore_index, reduction,
                                                     num_items_in_batch, logits.device, False)
        scale = kd_scale / host_norm / (vocab if reduction == "mean" else 1)
        if torch.is_grad_enabled() and logits.requires_grad:
            loss = topk_kl.TopKKLFunction.apply(
                logits, logprobs, indices, flat_labels, ignore_index, float(temperature), float(beta), scale,
                renormalize, norm, reduction != "none", backend,
            )
        else:
            loss, _ = topk_kl.topk_kl_fwd(logits, logprobs, indices, flat_labels, ignore_index, float(temperature),
                                          float(beta), scale, renormalize, False, backend)
            if reduction != "none":
                loss = loss.sum() / norm if norm is not None else loss.sum()
        return loss.reshape(leading) if reduction == "none" else loss

    hidden = student.reshape(-1, student.shape[-1])
    _check_ce_targets(flat_labels, ignore_index, vocab, ce_weight)
    rows, host_norm, norm = _valid_rows_and_norm(flat_labels, hidden.shape[0], ignore_index, reduction,
                                                 num_items_in_batch, hidden.device, drop_ignored_rows)
    scale = kd_scale / host_norm / (vocab if reduction == "mean" else 1)
    ce_scale = ce_weight / host_norm
    pass_labels = flat_labels if rows is None else None

    def chunk_loss(student_logits, index, compute_grad):
        pick = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))
        chunk_labels = pick(pass_labels) if pass_labels is not None else None
        loss_rows, dlogits = topk_kl.topk_kl_fwd(
            student_logits, pick(logprobs), pick(indices), chunk_labels, ignore_index, float(temperature),
            float(beta), scale, renormalize, compute_grad, backend,
        )
        dlogits = dlogits if compute_grad else None
        if ce_weight:
            targets = pick(flat_labels)
            valid = (targets != ignore_index) if rows is None else None
            loss_rows = loss_rows + fused_linear.cross_entropy_into(student_logits, targets, valid, ce_scale, dlogits)
        return loss_rows, dlogits

    return _run_fused(hidden, student_weight, student_bias, float(student_logit_scale), student_softcap, chunk_loss,
                      rows, chunk_size, norm, reduction, leading, fused_linear.resolve_gemm_dtype(gemm_dtype, hidden.device))
