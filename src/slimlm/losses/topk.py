"""Distillation from a sparse teacher, its k most likely tokens per position: ``topk_kl_div_loss``
on student logits and ``fused_linear_topk_kl_div_loss`` on hidden states and the student's LM
head, whose logits are never materialised (a chunk function on ``slimlm.losses.chunked``)."""
from __future__ import annotations

import inspect

import torch

from slimlm.architectures import LMHead
from slimlm.kernels.topk_kl import TopKKLFunction, topk_kl_fwd
from slimlm.losses.chunked import chunked_head_loss, loss_scales
from slimlm.losses.validation import (
    FLOAT_DTYPES,
    as_lm_head,
    check_chunk_size,
    check_head,
    check_labels,
    check_logits,
    check_options,
    check_weights,
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


def check_topk_options(tail, temperature, beta, reduction, num_items_in_batch, ce_weight, kd_weight) -> None:
    if tail not in TOPK_TAILS:
        raise ValueError(f"tail must be one of {', '.join(TOPK_TAILS)}, got {tail!r}")
    check_options(temperature, beta, reduction, num_items_in_batch)
    if tail == "renormalize" and beta != 0.0:
        raise ValueError(f"tail='renormalize' is a forward KL on the renormalised top-k: beta must be 0, got {beta!r}")
    check_weights(ce_weight, kd_weight)


def flat_topk(logprobs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k as the kernels take it: (N, k) fp32 log-probs and int64 indices, contiguous."""
    k = logprobs.shape[-1]
    return (logprobs.detach().reshape(-1, k).to(torch.float32).contiguous(),
            indices.reshape(-1, k).to(torch.int64).contiguous())


def topk_kl_div_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
    tail: str = "bucket",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    beta: float = 0.0,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    scale_by_temperature_sq: bool = True,
    kd_weight: float = 1.0,
    backend: str | None = None,
    student_weight: torch.Tensor | LMHead | None = None,
    **head_options,
) -> torch.Tensor:
    """Distillation from a sparse teacher: its k most likely tokens per position (k = 8 to 128).

    ``teacher_topk_logprobs`` (..., k) are log softmax(teacher / τ) at ``teacher_topk_indices``
    (..., k) (distinct per row, in [0, V)), as written by ``slimlm.distill.cache_teacher_topk``
    at the same τ. The student is Q = softmax(s / τ) over the FULL vocabulary of
    ``student_logits`` (..., V). The teacher's missing mass is handled by ``tail``:

    - ``"bucket"``: both distributions get one extra outcome, "any token outside the teacher's
      top-k": P_tail = 1 − Σ_k P_i, Q_tail = 1 − Σ_k Q_i (each clamped at the fp32 tiny
      number); D(P‖Q) of ``kl_div_loss`` (forward KL / reverse KL / JSD(β)) is taken over these
      k + 1 outcomes. Exact when k covers the whole support; the student is pushed to put the
      teacher's tail mass outside the top-k without being told where.
    - ``"renormalize"``: the teacher's top-k is renormalised to sum to 1 (its tail is dropped)
      and the loss is Σ_k P'_i (log P'_i − log Q_i) with the student's full-vocab log-probs, a
      forward KL (β must be 0) whose minimum puts all of the student's mass on the top-k.

    Each valid row contributes kd_weight · τ² · D. Reductions, τ² scaling, ``ignore_index`` and
    ``num_items_in_batch`` follow ``kl_div_loss`` (``mean`` divides by V). Indices are
    range-checked (one host read; a sync on CUDA). The gradient is made in the forward.

    Given ``student_weight`` (V, H) or the student's ``LMHead``, the first argument is hidden
    states and this is ``fused_linear_topk_kl_div_loss`` (``head_options`` are its options:
    student_bias, ce_weight, chunk_size, ...), the combined spelling older callers use.
    """
    if student_weight is not None:
        return fused_linear_topk_kl_div_loss(
            student_logits, student_weight, teacher_topk_logprobs, teacher_topk_indices, tail=tail, labels=labels,
            ignore_index=ignore_index, temperature=temperature, beta=beta, reduction=reduction,
            num_items_in_batch=num_items_in_batch, scale_by_temperature_sq=scale_by_temperature_sq,
            kd_weight=kd_weight, backend=backend, **head_options,
        )
    given = _head_options_given(head_options)
    if given:
        raise ValueError(f"{', '.join(given)} apply to the fused form (pass student_weight with hidden states, or "
                         "call fused_linear_topk_kl_div_loss)")
    check_topk_options(tail, temperature, beta, reduction, num_items_in_batch, 0.0, kd_weight)
    check_logits("student", student_logits)
    vocab = student_logits.shape[-1]
    leading = student_logits.shape[:-1]
    check_topk(teacher_topk_logprobs, teacher_topk_indices, leading, vocab, student_logits.device)
    check_labels(labels, leading, student_logits.device)

    logprobs, indices = flat_topk(teacher_topk_logprobs, teacher_topk_indices)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous() if labels is not None else None
    logits = student_logits.reshape(-1, vocab).contiguous()
    scales = loss_scales(flat_labels, logits.shape[0], vocab, ignore_index=ignore_index, reduction=reduction,
                         num_items_in_batch=num_items_in_batch, temperature=temperature,
                         scale_by_temperature_sq=scale_by_temperature_sq, kd_weight=kd_weight, ce_weight=0.0,
                         drop_ignored_rows=False, device=logits.device)
    renormalize = tail == "renormalize"
    if torch.is_grad_enabled() and logits.requires_grad:
        loss = TopKKLFunction.apply(logits, logprobs, indices, flat_labels, ignore_index, float(temperature),
                                    float(beta), scales.kd, renormalize, scales.norm, reduction != "none", backend)
    else:
        loss, _ = topk_kl_fwd(logits, logprobs, indices, flat_labels, ignore_index, float(temperature), float(beta),
                              scales.kd, renormalize, False, backend)
        if reduction != "none":
            loss = loss.sum() / scales.norm if scales.norm is not None else loss.sum()
    return loss.reshape(leading) if reduction == "none" else loss


def fused_linear_topk_kl_div_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor | LMHead,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    *,
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
    """``topk_kl_div_loss`` of the logits of ``student_hidden`` (..., H) through the student's
    LM head, which are never materialised, plus optional next-token CE.

    ``student_weight`` is (V, H) (with ``student_bias``, ``student_logit_scale`` and
    ``student_softcap``) or the student's whole ``LMHead``; logits are formed in fp32 row chunks
    exactly as in ``fused_linear_kl_div_loss`` (each valid row adds ce_weight · (logsumexp(s) −
    s[label]) on ``labels``; gradients of hidden/weight/bias computed in the forward;
    ``chunk_size``, ``drop_ignored_rows``, ``gemm_dtype``). The divergence, ``tail`` and the
    reductions are those of ``topk_kl_div_loss``.
    """
    check_topk_options(tail, temperature, beta, reduction, num_items_in_batch, ce_weight, kd_weight)
    head = as_lm_head("student", student_weight, student_bias, student_logit_scale, student_softcap)
    check_head("student", student_hidden, head)
    check_chunk_size(chunk_size)
    leading = student_hidden.shape[:-1]
    check_topk(teacher_topk_logprobs, teacher_topk_indices, leading, head.weight.shape[0], student_hidden.device)
    check_labels(labels, leading, student_hidden.device)
    renormalize = tail == "renormalize"

    def soft_loss(student_logits, teacher, chunk_labels, scale, compute_grad):
        logprobs, indices = teacher
        return topk_kl_fwd(student_logits, logprobs, indices, chunk_labels, ignore_index, float(temperature),
                           float(beta), scale, renormalize, compute_grad, backend)

    return chunked_head_loss(
        student_hidden, head, soft_loss, flat_topk(teacher_topk_logprobs, teacher_topk_indices), labels=labels,
        ignore_index=ignore_index, temperature=temperature, reduction=reduction, num_items_in_batch=num_items_in_batch,
        scale_by_temperature_sq=scale_by_temperature_sq, chunk_size=chunk_size, ce_weight=ce_weight,
        kd_weight=kd_weight, drop_ignored_rows=drop_ignored_rows, gemm_dtype=gemm_dtype,
    )


def _head_options_given(head_options: dict) -> list[str]:
    """The options of ``fused_linear_topk_kl_div_loss`` among ``head_options`` that are not at
    their defaults (a TypeError for a name it does not take)."""
    if not head_options:
        return []
    parameters = inspect.signature(fused_linear_topk_kl_div_loss).parameters
    defaults = {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(set(head_options) - set(defaults))
    if unknown:
        raise TypeError(f"topk_kl_div_loss() got unexpected keyword argument(s) {', '.join(unknown)}")
    return sorted(name for name, value in head_options.items()
                  if value is not defaults[name] and (isinstance(value, torch.Tensor) or value != defaults[name]))
