"""Hugging Face glue: a causal LM's LM head and last hidden state, and the fused loss between two models."""
from __future__ import annotations

import dataclasses

import torch

from slimlm import architectures
from slimlm.losses.kl_div import fused_linear_kl_div_loss


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
    applies each model's ``LMHead`` (``slimlm.architectures.lm_head``) (tied embeddings receive the
    gradient through the shared parameter). Labels follow Hugging Face's convention: unshifted,
    ``labels[:, t]`` is the token at t (default: ``input_ids``, padding from ``attention_mask``
    ignored); position t's logits are matched on ``labels[:, t + 1]``. ``options`` are those of
    ``fused_linear_kl_div_loss`` (temperature, beta, ce_weight, reduction, ...).
    """
    student_head, teacher_head = architectures.lm_head(student), architectures.lm_head(teacher)
    if student_head.weight.shape[0] != teacher_head.weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: the student's lm_head has {student_head.weight.shape[0]} rows, "
            f"the teacher's {teacher_head.weight.shape[0]}"
        )
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    elif labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
    student_hidden = last_hidden_state(student, input_ids, attention_mask)
    with torch.no_grad():
        teacher_hidden = last_hidden_state(teacher, input_ids, attention_mask)
    return fused_linear_kl_div_loss(student_hidden[:, :-1], student_head, teacher_hidden[:, :-1], teacher_head,
                                    labels=labels[:, 1:], ignore_index=ignore_index, **options)
