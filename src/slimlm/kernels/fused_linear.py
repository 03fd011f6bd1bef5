"""Fused linear head + distillation loss: logits are made one row chunk at a time, never kept.

For each chunk of rows: logits = (hidden @ Wᵀ + b) · logit_scale, optionally soft-capped
(cap · tanh(z / cap)), all in fp32 (the matmul output is never rounded to bf16 before the
softmax); a per-chunk loss kernel returns the chunk's loss rows and dlogits; the chain rule
through the soft-cap and scale is applied; then grad_hidden[chunk] = dlogits @ W and
grad_W += dlogitsᵀ @ hidden[chunk] (accumulated in fp32). Only (N,)-sized statistics and
the (N, H) / (V, H) gradients outlive a chunk, so peak memory does not grow with N beyond them.

The loss kernel is a callback, so the same loop serves the dense teacher (``kl_div_fwd`` on
teacher logits made from the teacher's hidden states) and the sparse top-k teacher.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

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
    precision, as ``LinearHead`` describes)."""
    if gemm_dtype is None:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return None
    if gemm_dtype not in (torch.float32, torch.float64) + LOW_PRECISION:
        raise ValueError(f"gemm_dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {gemm_dtype!r}")
    return gemm_dtype


@dataclasses.dataclass
class LinearHead:
    """One side's LM head: logits = softcap((hidden @ weightᵀ + bias) · logit_scale).

    ``gemm_dtype`` sets the operands of the three GEMMs (logits, grad_hidden, grad_weight):
    None keeps them exact (fp32, or a low-precision weight as it is where the device has
    an fp32-output mixed matmul); bf16/fp16 casts both operands, as autocast would, with
    fp32 accumulation and, where no fp32-output matmul exists (CPU), the chunk's logits
    rounded to that dtype before the fp32 softmax, as autocast's own LM head gives them.
    Softmax, loss and the weight-gradient accumulator stay fp32 either way.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None
    gemm_dtype: torch.dtype | None = None

    def __post_init__(self):
        # fp64 stays fp64 (references); everything else computes in fp32.
        self.compute_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        mixed_available = _mixed_mm_works(self.weight.device.type)
        if self.gemm_dtype is None:
            low = self.weight.dtype in LOW_PRECISION and mixed_available
            self.operand_dtype = self.weight.dtype if low else self.compute_dtype
        else:
            self.operand_dtype = self.gemm_dtype if self.gemm_dtype in LOW_PRECISION else self.compute_dtype
        self.low_precision = self.operand_dtype != self.compute_dtype
        self.mixed = self.low_precision and mixed_available
        # One cast of W per call (independent of N); casting per chunk would copy V×H per chunk.
        self.weight_operand = self.weight.to(self.operand_dtype)
        self.bias_fp32 = self.bias.to(self.compute_dtype) if self.bias is not None else None
        # CPU has no caching allocator: a fresh (C, V) block per chunk is page-faulted in every
        # time, so the logits of every chunk reuse one buffer (its previous contents are dead
        # once the chunk's gradient is out).
        self._buffer: torch.Tensor | None = None

    def _out(self, rows: int) -> torch.Tensor | None:
        if self.weight.device.type != "cpu":
            return None
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(rows, self.weight.shape[0], dtype=self.compute_dtype)
        return self._buffer[:rows]

    def operand(self, hidden: torch.Tensor) -> torch.Tensor:
        """A (C, H) chunk in the GEMMs' operand dtype (cast once, used by logits and backward)."""
        return hidden.to(self.operand_dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of a (C, H) chunk given by ``operand``, after scale and soft-cap."""
        if self.mixed:
            logits = torch.mm(hidden, self.weight_operand.t(), out_dtype=self.compute_dtype)
            if self.bias_fp32 is not None:
                logits.add_(self.bias_fp32)
        elif self.low_precision:
            rounded = torch.mm(hidden, self.weight_operand.t())
            out = self._out(hidden.shape[0])
            logits = out.copy_(rounded) if out is not None else rounded.to(self.compute_dtype)
            del rounded
            if self.bias_fp32 is not None:
                logits.add_(self.bias_fp32)
        elif self.bias_fp32 is not None:
            logits = torch.addmm(self.bias_fp32, hidden, self.weight_operand.t(), out=self._out(hidden.shape[0]))
        else:
            logits = torch.mm(hidden, self.weight_operand.t(), out=self._out(hidden.shape[0]))
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def chain(self, dlogits: torch.Tensor, logits: torch.Tensor) -> None:
        """d loss / d(hidden @ Wᵀ + b) from d loss / d logits, in place.

        d(cap·tanh(z/cap))/dz = 1 − (logit/cap)², written with the capped logits kept from
        the forward; the scale contributes its constant factor.
        """
        if self.softcap is not None:
            dlogits.mul_(torch.square(logits.div(self.softcap)).neg_().add_(1.0))
        if self.logit_scale != 1.0:
            dlogits.mul_(self.logit_scale)

    def backward(self, dlogits: torch.Tensor, hidden: torch.Tensor, grad_weight_fp32: torch.Tensor | None,
                 grad_bias_fp32: torch.Tensor | None, want_grad_hidden: bool) -> torch.Tensor | None:
        """Accumulates dWᵀ += dlogitsᵀ @ hidden, db += Σ dlogits; returns dlogits @ W in the
        operand dtype (``hidden`` is the chunk given by ``operand``)."""
        if grad_bias_fp32 is not None:
            grad_bias_fp32.add_(dlogits.sum(0))
        if not self.low_precision:
            if grad_weight_fp32 is not None:
                grad_weight_fp32.addmm_(dlogits.t(), hidden)
            return torch.mm(dlogits, self.weight_operand) if want_grad_hidden else None
        low = dlogits.to(self.operand_dtype)
        if grad_weight_fp32 is not None:
            if self.mixed and _mixed_addmm_inplace_works(self.weight.device.type):
                torch.addmm(grad_weight_fp32, low.t(), hidden, out_dtype=self.compute_dtype, out=grad_weight_fp32)
            elif self.mixed:
                grad_weight_fp32.add_(torch.mm(low.t(), hidden, out_dtype=self.compute_dtype))
            else:
                grad_weight_fp32.add_(torch.mm(low.t(), hidden))
        return torch.mm(low, self.weight_operand) if want_grad_hidden else None


# loss_fn(student_logits_fp32 (C, V), rows (C,) int64 row indices into the full batch, or a
# slice, compute_grad) -> (loss rows fp32 (C,), dlogits fp32 (C, V) or None)
ChunkLoss = Callable[[torch.Tensor, "torch.Tensor | slice", bool], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclasses.dataclass
class ChunkedResult:
    loss_rows: torch.Tensor  # (N,) fp32, 0 on rows that were not computed
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None  # fp32
    grad_bias: torch.Tensor | None  # fp32


def chunked_linear_loss(
    hidden: torch.Tensor,
    head: LinearHead,
    loss_fn: ChunkLoss,
    *,
    rows: torch.Tensor | None,
    chunk_size: int | None,
    need_grad_hidden: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
    row_weights: torch.Tensor | None = None,
) -> ChunkedResult:
    """Runs ``loss_fn`` over row chunks of ``hidden`` (N, H) through ``head``.

    ``rows``: indices of the rows to compute (others get loss 0 and zero gradient), or None
    for all rows. ``row_weights`` (N,) multiplies each row's dlogits before the matmuls
    (the backward of an unreduced loss).
    """
    num_rows = hidden.shape[0]
    vocab = head.weight.shape[0]
    device = hidden.device
    compute_grad = need_grad_hidden or need_grad_weight or need_grad_bias
    loss_rows = torch.zeros(num_rows, dtype=head.compute_dtype, device=device)
    grad_hidden = torch.zeros_like(hidden) if need_grad_hidden else None
    grad_weight = torch.zeros(head.weight.shape, dtype=head.compute_dtype, device=device) if need_grad_weight else None
    grad_bias = torch.zeros(vocab, dtype=head.compute_dtype, device=device) if need_grad_bias else None

    count = num_rows if rows is None else rows.numel()
    step = chunk_size or pick_chunk_size(count, vocab, device)
    for start in range(0, count, step):
        stop = min(start + step, count)
        # Contiguous slices need no gather copy; dropped rows force an index_select.
        index = slice(start, stop) if rows is None else rows[start:stop]
        chunk = head.operand(hidden[index] if rows is None else hidden.index_select(0, index))
        logits = head.logits(chunk)
        chunk_loss, dlogits = loss_fn(logits, index, compute_grad)
        if rows is None:
            loss_rows[index] = chunk_loss
        else:
            loss_rows.index_copy_(0, index, chunk_loss)
        if not compute_grad:
            continue
        head.chain(dlogits, logits)
        del logits
        if row_weights is not None:
            dlogits.mul_(row_weights[index].unsqueeze(1).to(dlogits.dtype))
        grad_chunk = head.backward(dlogits, chunk, grad_weight, grad_bias, need_grad_hidden)
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
