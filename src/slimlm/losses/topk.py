"""``topk_kl_div_loss``: distillation from a sparse teacher, its k most likely tokens per position."""
from __future__ import annotations

import torch

from slimlm.architectures import LMHead
from slimlm.kernels import fused_linear, topk_kl
from slimlm.losses.fused_linear import run_fused
from slimlm.losses.validation import (
    FLOAT_DTYPES,
    as_lm_head,
    check_ce_targets,
    check_chunk_size,
    check_head,
    check_labels,
    check_logits,
    check_options,
    check_weights,
    valid_rows_and_norm,
)

TOPK_TAILS = ("bucket", "renormalize")


def check_topk(logprobs, indices, leading: torch.Size, vocab: int, device: torch.device) -> None:
    if not isinstance(logprobs, torch.Tensor) or logprobs.dtype not in FLOAT_DTYPES:
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
    student_weight: torch.Tensor | LMHead | None = None,
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

    ``student`` is logits (..., V), or hidden states (..., H) when ``student_weight`` (V, H) (or
    the student's whole ``LMHead``) is given: then logits are formed in fp32 row chunks and never kept, exactly as in
    ``fused_linear_kl_div_loss`` (bias, logit scale, soft-cap, ``ce_weight`` next-token CE on
    ``labels``, gradients of hidden/weight/bias computed in the forward, ``gemm_dtype``). Reductions, τ²
    scaling, ``ignore_index`` and ``num_items_in_batch`` follow ``kl_div_loss`` (``mean``
    divides the KD term by V). Indices are range-checked (one host read; a sync on CUDA).
    """
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    check_options(temperature, beta, reduction, num_items_in_batch)
    if tail == "renormalize" and beta != 0.0:
        raise ValueError(f"tail='renormalize' is a forward KL on the renormalised top-k: beta must be 0, got {beta!r}")
    check_weights(ce_weight, kd_weight)
    fused = student_weight is not None
    if fused:
        head = as_lm_head("student", student_weight, student_bias, student_logit_scale, student_softcap)
        check_head("student", student, head)
        check_chunk_size(chunk_size)
        vocab = head.weight.shape[0]
    else:
        check_logits("student", student)
        if student_bias is not None or ce_weight:
            raise ValueError("student_bias and ce_weight apply to the fused form (pass student_weight with hidden states)")
        vocab = student.shape[-1]
    leading = student.shape[:-1]
    check_topk(teacher_topk_logprobs, teacher_topk_indices, leading, vocab, student.device)
    check_labels(labels, leading, student.device)

    k = teacher_topk_logprobs.shape[-1]
    logprobs = teacher_topk_logprobs.detach().reshape(-1, k).to(torch.float32).contiguous()
    indices = teacher_topk_indices.reshape(-1, k).to(torch.int64).contiguous()
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    renormalize = tail == "renormalize"
    kd_scale = kd_weight * (float(temperature) ** 2 if scale_by_temperature_sq else 1.0)

    if not fused:
        logits = student.reshape(-1, vocab).contiguous()
        rows, host_norm, norm = valid_rows_and_norm(flat_labels, logits.shape[0], ignore_index, reduction,
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
    check_ce_targets(flat_labels, ignore_index, vocab, ce_weight)
    rows, host_norm, norm = valid_rows_and_norm(flat_labels, hidden.shape[0], ignore_index, reduction,
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

    return run_fused(hidden, head, chunk_loss, rows, chunk_size, norm, reduction, leading,
                     fused_linear.resolve_gemm_dtype(gemm_dtype, hidden.device))
