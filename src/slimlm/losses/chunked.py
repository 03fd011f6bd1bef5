"""The chunked LM-head loss base (Liger-Kernel's ``chunked_loss/`` design): logits are made one
row chunk at a time and never kept.

For each chunk of rows: logits = softcap((hidden @ Wᵀ + b) · logit_scale) (the student's
``LMHead``), all in fp32 (the matmul output is never rounded to bf16 before the softmax unless
``gemm_dtype`` asks for autocast's numbers); the loss's chunk function returns the chunk's loss
rows and dlogits; the next-token CE adds its own; the chain rule through the soft-cap and scale
is applied; then grad_hidden[chunk] = dlogits @ W and grad_W += dlogitsᵀ @ hidden[chunk]
(accumulated in fp32). Only (N,)-sized statistics and the (N, H) / (V, H) gradients outlive a
chunk, so peak memory does not grow with N beyond them.

A loss is its chunk function (``SoftLoss``: the dense KL on teacher logits, the sparse top-k
divergence); ``chunked_head_loss`` owns everything around it: the valid-row count and the
reduction's normalisation (``loss_scales``), the teacher's logits when the teacher is a head
too, the CE term, the GEMMs and their precision (``HeadGemms``), the chunk size, the loop
(``chunked_linear_loss``) and the autograd function (``FusedLinearLossFunction``).

It is over 400 lines on purpose: the loop, its autograd function, the GEMM precision probes and
the CE term share one memory plan (the chunk budget above), which splitting would scatter.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import torch

from slimlm.architectures import LMHead
from slimlm.losses.validation import check_ce_targets

# Bytes of chunk-local working memory per logit: fp32 student and teacher logits, fp32
# dlogits from the kernel, one fp32 temporary (soft-cap derivative, CE softmax) and the
# low-precision copy of dlogits fed to the backward matmuls.
BYTES_PER_CHUNK_LOGIT = 18
# CPU: 288 rows at V = 49152, enough rows for full-speed GEMMs. CUDA: 464 rows at V = 128256,
# so that the chunk buffers plus the fp32 weight gradient (2 GiB at 128256 × 4096) stay
# under a fifth of the unfused computation's peak.
MEMORY_BUDGET_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}


def pick_chunk_size(rows: int, vocab: int, device: torch.device, budget_bytes: int | None = None) -> int:
    """Rows per chunk so the chunk's working set stays within the device's memory budget.

    Rounded down to a multiple of 16 (GEMM tiles) when that leaves at least 16 rows.
    """
    budget = budget_bytes if budget_bytes is not None else MEMORY_BUDGET_BYTES.get(device.type, 256 << 20)
    chunk = max(1, budget // (BYTES_PER_CHUNK_LOGIT * max(vocab, 1)))
    if chunk >= 16:
        chunk -= chunk % 16
    return max(1, min(chunk, max(rows, 1)))


@functools.lru_cache(maxsize=None)
def _mixed_mm_works(device_type: str) -> bool:
    """Whether ``torch.mm(bf16, bf16, out_dtype=float32)`` runs on this device type.

    CUDA has it (fp32 accumulation and output without a bf16 rounding); CPU builds do not,
    so there the low-precision operands are upcast instead.
    """
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device_type)
        out = torch.mm(a, a.t(), out_dtype=torch.float32)
        return out.dtype == torch.float32 and bool((out == 3).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def _mixed_addmm_inplace_works(device_type: str) -> bool:
    """Whether ``torch.addmm(acc_fp32, bf16, bf16, out_dtype=float32, out=acc_fp32)`` works in place."""
    if not _mixed_mm_works(device_type):
        return False
    try:
        acc = torch.ones(2, 2, dtype=torch.float32, device=device_type)
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device_type)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        return bool((acc == 4).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_gemm_dtype(gemm_dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The operand dtype of the head GEMMs: ``gemm_dtype`` when given, else the autocast
    dtype when autocast is on for ``device`` at the call, else None (exact: the weights' own
    precision, as ``HeadGemms`` describes)."""
    if gemm_dtype is None:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return None
    if gemm_dtype not in (torch.float32, torch.float64) + LOW_PRECISION:
        raise ValueError(f"gemm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {gemm_dtype!r}")
    return gemm_dtype


class HeadGemms:
    """The three GEMMs of one (detached) ``LMHead`` over row chunks — logits, grad_hidden,
    grad_weight — in one precision for the whole call.

    ``gemm_dtype`` (resolved) sets their operands: None keeps them exact (fp32, or a
    low-precision weight as it is where the device has an fp32-output mixed matmul); bf16/fp16
    casts both operands, as autocast would, with fp32 accumulation and, where no fp32-output
    matmul exists (CPU), the chunk's logits rounded to that dtype before the fp32 softmax, as
    autocast's own LM head gives them. Softmax, loss and the weight-gradient accumulator stay fp32.
    """

    def __init__(self, head: LMHead, gemm_dtype: torch.dtype | None):
        self.head = head.detached()
        weight = self.head.weight
        # fp64 stays fp64 (references); everything else computes in fp32.
        self.compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        mixed_available = _mixed_mm_works(weight.device.type)
        if gemm_dtype is None:
            low = weight.dtype in LOW_PRECISION and mixed_available
            self.operand_dtype = weight.dtype if low else self.compute_dtype
        else:
            self.operand_dtype = gemm_dtype if gemm_dtype in LOW_PRECISION else self.compute_dtype
        self.low_precision = self.operand_dtype != self.compute_dtype
        self.mixed = self.low_precision and mixed_available
        # One cast of W per call (independent of N); casting per chunk would copy V×H per chunk.
        self.weight_operand = weight.to(self.operand_dtype)
        self.bias = self.head.bias.to(self.compute_dtype) if self.head.bias is not None else None
        # CPU has no caching allocator: a fresh (C, V) block per chunk is page-faulted in every
        # time, so the logits of every chunk reuse one buffer (its previous contents are dead
        # once the chunk's gradient is out).
        self._buffer: torch.Tensor | None = None

    def _out(self, rows: int) -> torch.Tensor | None:
        if self.weight_operand.device.type != "cpu":
            return None
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(rows, self.weight_operand.shape[0], dtype=self.compute_dtype)
        return self._buffer[:rows]

    def operand(self, hidden: torch.Tensor) -> torch.Tensor:
        """A (C, H) chunk in the GEMMs' operand dtype (cast once, used by logits and backward)."""
        return hidden.to(self.operand_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a (C, H) chunk given by ``operand``, after the head's scale and soft-cap."""
        if self.mixed:
            logits = torch.mm(hidden, self.weight_operand.t(), out_dtype=self.compute_dtype)
            if self.bias is not None:
                logits.add_(self.bias)
        elif self.low_precision:
            rounded = torch.mm(hidden, self.weight_operand.t())
            out = self._out(hidden.shape[0])
            logits = out.copy_(rounded) if out is not None else rounded.to(self.compute_dtype)
            del rounded
            if self.bias is not None:
                logits.add_(self.bias)
        elif self.bias is not None:
            logits = torch.addmm(self.bias, hidden, self.weight_operand.t(), out=self._out(hidden.shape[0]))
        else:
            logits = torch.mm(hidden, self.weight_operand.t(), out=self._out(hidden.shape[0]))
        return self.head.scale_and_cap(logits, in_place=True)

    def backward(self, dlogits: torch.Tensor, hidden: torch.Tensor, grad_weight_fp32: torch.Tensor | None,
                 grad_bias_fp32: torch.Tensor | None, want_grad_hidden: bool) -> torch.Tensor | None:
        """Accumulates dWᵀ += dlogitsᵀ @ hidden, db += Σ dlogits; returns dlogits @ W in the
        operand dtype (``dlogits`` with respect to hidden @ Wᵀ + b; ``hidden`` the chunk given
        by ``operand``)."""
        if grad_bias_fp32 is not None:
            grad_bias_fp32.add_(dlogits.sum(0))
        if not self.low_precision:
            if grad_weight_fp32 is not None:
                grad_weight_fp32.addmm_(dlogits.t(), hidden)
            return torch.mm(dlogits, self.weight_operand) if want_grad_hidden else None
        low = dlogits.to(self.operand_dtype)
        if grad_weight_fp32 is not None:
            if self.mixed and _mixed_addmm_inplace_works(self.weight_operand.device.type):
                torch.addmm(grad_weight_fp32, low.t(), hidden, out_dtype=self.compute_dtype, out=grad_weight_fp32)
            elif self.mixed:
                grad_weight_fp32.add_(torch.mm(low.t(), hidden, out_dtype=self.compute_dtype))
            else:
                grad_weight_fp32.add_(torch.mm(low.t(), hidden))
        return torch.mm(low, self.weight_operand) if want_grad_hidden else None


# loss_fn(student_logits_fp32 (C, V), rows (C,) int64 row indices into the full batch, or a
# slice, compute_grad) -> (loss rows fp32 (C,), dlogits fp32 (C, V) or None)
ChunkLoss = Callable[[torch.Tensor, "torch.Tensor | slice", bool], "tuple[torch.Tensor, torch.Tensor | None]"]
# A loss's chunk function: soft_loss(student_logits fp32 (C, V), teacher: its per-row inputs for
# the chunk, labels (C,) int64 or None when every row is valid, scale, compute_grad)
# -> (scale · divergence rows fp32 (C,), their dlogits (C, V), or anything when not compute_grad)
SoftLoss = Callable[[torch.Tensor, tuple, "torch.Tensor | None", float, bool], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class ChunkedResult:
    loss_rows: torch.Tensor  # (N,) fp32, 0 on rows that were not computed
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None  # fp32
    grad_bias: torch.Tensor | None  # fp32


def chunked_linear_loss(
    hidden: torch.Tensor,
    gemms: HeadGemms,
    loss_fn: ChunkLoss,
    *,
    rows: torch.Tensor | None,
    chunk_size: int | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    row_weights: torch.Tensor | None = None,
) -> ChunkedResult:
    """Runs ``loss_fn`` over row chunks of ``hidden`` (N, H) through the head of ``gemms``.

    ``rows``: indices of the rows to compute (others get loss 0 and zero gradient), or None
    for all rows. ``row_weights`` (N,) multiplies each row's dlogits before the matmuls
    (the backward of an unreduced loss).
    """
    num_rows = hidden.shape[0]
    weight = gemms.head.weight
    vocab = weight.shape[0]
    device = hidden.device
    compute_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    loss_rows = torch.zeros(num_rows, dtype=gemms.compute_dtype, device=device)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=gemms.compute_dtype, device=device) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=gemms.compute_dtype, device=device) if need_grad_bias else None

    count = num_rows if rows is None else rows.numel()
    step = chunk_size or pick_chunk_size(count, vocab, device)
    for start in range(0, count, step):
        stop = min(start + step, count)
        # Contiguous slices need no gather copy; dropped rows force an index_select.
        index = slice(start, stop) if rows is None else rows[start:stop]
        chunk = gemms.operand(hidden[index] if rows is None else hidden.index_select(0, index))
        logits = gemms.logits(chunk)
        chunk_loss, dlogits = loss_fn(logits, index, compute_grad)
        if rows is None:
            loss_rows[index] = chunk_loss
        else:
            loss_rows.index_copy_(0, index, chunk_loss)
        if not compute_grad:
            continue
        gemms.head.chain_(dlogits, logits)
        del logits
        if row_weights is not None:
            dlogits.mul_(row_weights[index].unsqueeze(1).to(dlogits.dtype))
        grad_chunk = gemms.backward(dlogits, chunk, grad_weight, grad_bias, need_grad_hidden)
        if grad_chunk is not None:
            if rows is None:
                grad_hidden[index] = grad_chunk
            else:
                grad_hidden.index_copy_(0, index, grad_chunk.to(grad_hidden.dtype))
    return ChunkedResult(loss_rows, grad_hidden, grad_weight, grad_bias)


def cross_entropy_into(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None, scale: float,
                       dlogits: torch.Tensor | None) -> torch.Tensor:
    """Next-token CE rows of fp32 logits, scale · (logsumexp − logit[target]); adds its gradient.

    ``valid`` masks rows that count (None: all). ``dlogits`` += scale · (softmax − onehot)
    on valid rows, in place.
    """
    safe_targets = targets if valid is None else torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    rows = (lse - logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)) * scale
    weight = torch.full_like(lse, scale) if valid is None else valid.to(torch.float32) * scale
    if valid is not None:
        rows = rows * valid
    if dlogits is not None:
        softmax = torch.sub(logits, lse.unsqueeze(1)).exp_().mul_(weight.unsqueeze(1))
        dlogits.add_(softmax)
        del softmax
        dlogits.scatter_add_(1, safe_targets.unsqueeze(1), -weight.unsqueeze(1))
    return rows


# run(hidden, weight, bias, need_grad_hidden, need_grad_weight, need_grad_bias, row_weights) -> ChunkedResult
ChunkRunner = Callable[..., ChunkedResult]


class FusedLinearLossFunction(torch.autograd.Function):
    """loss = reduce(rows of a chunked linear loss); gradients come from the forward pass.

    Reduced losses: the forward computes and keeps grad_hidden, grad_weight (fp32) and
    grad_bias; backward scales them by grad_output / norm (``norm``: the reduction's divisor
    as a 0-dim tensor, or None when it was folded into the kernel scales on the host).
    Unreduced losses (one value per row): a row's weight in backward is only known then, so
    the forward keeps no gradient and backward reruns the chunks with those row weights.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, run: ChunkRunner, norm, reduce_rows: bool):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.reduce_rows = reduce_rows
        ctx.consumed = False
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        if reduce_rows:
            result = run(hidden, weight, bias, *needs, None)
            ctx.result = result
            ctx.save_for_backward(norm if norm is not None else torch.ones((), device=hidden.device))
            loss = result.loss_rows.sum()
            return loss / norm if norm is not None else loss
        result = run(hidden, weight, bias, False, False, False, None)
        ctx.run = run
        ctx.save_for_backward(hidden, weight, bias)
        return result.loss_rows

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.consumed:
            raise RuntimeError(
                "fused linear loss: backward ran twice through the same graph; its gradient is computed in "
                "the forward pass and scaled in place, so recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.bias_dtype is not None and ctx.needs_input_grad[2])
        if ctx.reduce_rows:
            (norm,) = ctx.saved_tensors
            result = ctx.result
            del ctx.result
            factor = grad_output / norm
            # On CPU the check is free and the common factor 1 saves passes over the gradients.
            scale = factor.device.type != "cpu" or torch.compiler.is_compiling() or not bool(factor == 1)
            for grad in (result.grad_hidden, result.grad_weight, result.grad_bias):
                if grad is not None and scale:
                    grad.mul_(factor.to(grad.dtype))
        else:
            hidden, weight, bias = ctx.saved_tensors
            result = ctx.run(hidden, weight, bias, *needs, grad_output.reshape(-1))
            del ctx.run
        grad_weight = result.grad_weight.to(ctx.weight_dtype) if needs[1] else None
        grad_bias = result.grad_bias.to(ctx.bias_dtype) if needs[2] else None
        return (result.grad_hidden if needs[0] else None), grad_weight, grad_bias, None, None, None


def valid_rows_and_norm(flat_labels, num_rows, ignore_index, reduction, num_items_in_batch, device, drop_ignored_rows):
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


class LossScales(NamedTuple):
    """How a loss's rows are counted and weighted."""

    rows: torch.Tensor | None  # the row indices to compute (valid rows), None: all
    kd: float  # factor of the divergence rows: kd_weight · τ² (when scaled) / host divisor (/ V for "mean")
    ce: float  # factor of the CE rows: ce_weight / host divisor
    norm: torch.Tensor | None  # the divisor left for after the sum, a 0-dim tensor; None: folded into kd and ce


def loss_scales(flat_labels, num_rows: int, vocab: int, *, ignore_index: int, reduction: str, num_items_in_batch,
                temperature: float, scale_by_temperature_sq: bool, kd_weight: float, ce_weight: float,
                drop_ignored_rows: bool | None, device: torch.device) -> LossScales:
    """The valid-row count and the reduction's normalisation (``valid_rows_and_norm``), folded
    into the factors of the divergence and CE rows: ``batchmean`` and ``mean`` divide by the
    valid-row count (or ``num_items_in_batch``), ``mean`` also divides the divergence by V."""
    rows, host_norm, norm = valid_rows_and_norm(flat_labels, num_rows, ignore_index, reduction, num_items_in_batch,
                                                device, drop_ignored_rows)
    kd = kd_weight * (float(temperature) ** 2 if scale_by_temperature_sq else 1.0) / host_norm
    if reduction == "mean":
        kd /= vocab
    return LossScales(rows, kd, ce_weight / host_norm, norm)


def chunked_head_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    soft_loss: SoftLoss,
    teacher: tuple[torch.Tensor, ...],
    *,
    teacher_head: LMHead | None = None,
    labels: torch.Tensor | None,
    ignore_index: int,
    temperature: float,
    reduction: str,
    num_items_in_batch,
    scale_by_temperature_sq: bool,
    chunk_size: int | None,
    ce_weight: float,
    kd_weight: float,
    drop_ignored_rows: bool | None,
    gemm_dtype: torch.dtype | None,
    return_terms: bool = False,
) -> torch.Tensor | dict:
    """Σ over valid rows of kd_weight · τ² · soft_loss + ce_weight · (logsumexp(s) − s[label]),
    reduced, where s are the logits of ``student_hidden`` (..., H) through ``student_head``,
    made in row chunks and never kept. Inputs are checked by the caller.

    ``teacher``: the soft loss's per-row inputs, (N, ...) each for the N = prod(leading) rows,
    given to it a chunk at a time; with ``teacher_head`` it is (teacher hidden states,) and the
    soft loss gets (their fp32 logits through that head,) (same ``gemm_dtype``). Everything else as in
    ``fused_linear_kl_div_loss``: the gradients of the student's hidden states, weight and bias
    are made in the forward (``FusedLinearLossFunction``), ``return_terms=True`` returns
    ``{"loss", "kd", "ce"}`` with the unweighted, detached terms reduced like the total.
    """
    leading = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    vocab = student_head.weight.shape[0]
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    check_ce_targets(flat_labels, ignore_index, vocab, ce_weight)
    scales = loss_scales(flat_labels, hidden.shape[0], vocab, ignore_index=ignore_index, reduction=reduction,
                         num_items_in_batch=num_items_in_batch, temperature=temperature,
                         scale_by_temperature_sq=scale_by_temperature_sq, kd_weight=kd_weight, ce_weight=ce_weight,
                         drop_ignored_rows=drop_ignored_rows, device=hidden.device)
    rows = scales.rows
    gemm_dtype = resolve_gemm_dtype(gemm_dtype, hidden.device)
    teacher_gemms = HeadGemms(teacher_head, gemm_dtype) if teacher_head is not None else None
    # With dropped rows every chunk row is valid; otherwise the soft loss masks by label.
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
        take = (lambda t: t[index]) if isinstance(index, slice) else (lambda t: t.index_select(0, index))  # noqa: E731
        if scales.kd != 0:
            teacher_chunk = tuple(take(t) for t in teacher)
            if teacher_gemms is not None:
                teacher_chunk = (teacher_gemms.logits(teacher_gemms.operand(*teacher_chunk)).to(student_logits.dtype),)
            chunk_labels = take(pass_labels) if pass_labels is not None else None
            loss_rows, dlogits = soft_loss(student_logits, teacher_chunk, chunk_labels, scales.kd, compute_grad)
            del teacher_chunk
            dlogits = dlogits if compute_grad else None
        else:
            loss_rows = student_logits.new_zeros(student_logits.shape[0])
            dlogits = torch.zeros_like(student_logits) if compute_grad else None
        keep_term("kd", index, loss_rows, kd_weight)
        if ce_weight:
            targets = take(flat_labels)
            valid = (targets != ignore_index) if rows is None else None
            ce_rows = cross_entropy_into(student_logits, targets, valid, scales.ce, dlogits)
            keep_term("ce", index, ce_rows, ce_weight)
            loss_rows = loss_rows + ce_rows
        return loss_rows, dlogits

    loss = _student_loss(hidden, student_head, chunk_loss, rows, chunk_size, scales.norm, reduction != "none",
                         gemm_dtype)
    loss = loss.reshape(leading) if reduction == "none" else loss
    if not return_terms:
        return loss
    terms = {"loss": loss}
    for name, values in term_rows.items():
        if reduction == "none":
            terms[name] = values.reshape(leading)
        else:
            total = values.sum()
            terms[name] = total / scales.norm if scales.norm is not None else total
    return terms


def _student_loss(hidden, head: LMHead, chunk_loss: ChunkLoss, rows, chunk_size, norm, reduce_rows: bool,
                  gemm_dtype) -> torch.Tensor:
    """The student side through ``FusedLinearLossFunction``, or the loss alone when no graph is wanted.

    ``gemm_dtype`` is already resolved: autocast is off inside, so the GEMMs run exactly in
    the precision chosen at the call, in forward and backward.
    """

    def run(hidden_, weight_, bias_, need_hidden, need_weight, need_bias, row_weights):
        with torch.autocast(hidden_.device.type, enabled=False):
            return chunked_linear_loss(
                hidden_.detach(), HeadGemms(dataclasses.replace(head, weight=weight_, bias=bias_), gemm_dtype),
                chunk_loss, rows=rows, chunk_size=chunk_size, need_grad_hidden=need_hidden,
                need_grad_weight=need_weight, need_grad_bias=need_bias, row_weights=row_weights,
            )

    weight, bias = head.weight, head.bias
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return FusedLinearLossFunction.apply(hidden, weight, bias, run, norm, reduce_rows)
    # No graph (no_grad, evaluation): the loss alone, without the gradient work of the forward.
    loss = run(hidden, weight, bias, False, False, False, None).loss_rows
    if not reduce_rows:
        return loss
    return loss.sum() / norm if norm is not None else loss.sum()
