"""On-policy distillation (GKD, Agarwal et al. 2024): on a fraction λ of the batches the
student writes the continuation itself and the teacher scores the student's own tokens, so the
student learns where its own samples go wrong instead of only on text it would not write.

The data here are blocks of plain text, not prompt/answer pairs: the first
``prompt_fraction`` of each block is the prompt, and the student samples the rest of the
block (same length, EOS suppressed, so batches keep their shape). Only the sampled positions
count in the loss (labels −100 on the prompt), whose divergence is the trainer's (β: forward
KL, reverse KL or JSD(β)).
"""
from __future__ import annotations

import math
import random

import torch


class OnPolicySampler:
    """Decides which batches are on-policy and replaces them with the student's samples.

    Each call of ``maybe_resample`` is one micro-batch; within an optimizer step they are
    numbered 0, 1, ... (gradient accumulation), and the decision is ``use_student_samples`` of
    (seed, step, that number), so resuming from a checkpoint repeats the same choices.
    """

    def __init__(self, fraction: float, *, prompt_fraction: float, temperature: float, seed: int):
        self.fraction, self.prompt_fraction, self.temperature, self.seed = fraction, prompt_fraction, temperature, seed
        self._step, self._micro_step = None, 0

    def maybe_resample(self, model, inputs: dict, step: int) -> dict:
        self._micro_step = self._micro_step + 1 if step == self._step else 0
        self._step = step
        if not use_student_samples(self.fraction, self.seed, step, self._micro_step):
            return inputs
        sampled = student_continuations(model, inputs["input_ids"], inputs.get("attention_mask"),
                                        prompt_fraction=self.prompt_fraction, temperature=self.temperature)
        return {**inputs, **sampled}


def use_student_samples(fraction: float, seed: int, step: int, micro_step: int) -> bool:
    """Whether the batch of optimizer ``step`` / accumulation ``micro_step`` is on-policy: a coin
    of probability ``fraction`` seeded by (seed, step, micro_step), so a resumed run or another
    rank decides the same."""
    if fraction <= 0:
        return False
    if fraction >= 1:
        return True
    return random.Random(f"{seed}/{step}/{micro_step}").random() < fraction


@torch.no_grad()
def student_continuations(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                          prompt_fraction: float = 0.5, temperature: float = 1.0) -> dict:
    """The batch with each row's tokens after its prompt (the first ⌈prompt_fraction · T⌉,
    at least 1, at most T − 1) replaced by ``model``'s sampled continuation at ``temperature``
    (full vocabulary, no top-k/p). Rows whose prompt holds padding keep their own text, as do
    their labels. Returns input_ids, attention_mask and labels (−100 on prompts and padding),
    with the model put back in the mode it was in."""
    batch, length = input_ids.shape
    if length < 2:
        raise ValueError(f"on-policy distillation needs blocks of at least 2 tokens, got {length}")
    prompt = min(length - 1, max(1, math.ceil(prompt_fraction * length)))
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    labels = input_ids.masked_fill(mask == 0, -100)
    full_prompt = mask[:, :prompt].all(dim=1)
    if not full_prompt.any():
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    was_training = model.training
    model.eval()
    try:
        sampled = model.generate(
            input_ids=input_ids[full_prompt, :prompt], attention_mask=mask[full_prompt, :prompt],
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
            max_new_tokens=length - prompt, min_new_tokens=length - prompt,
            pad_token_id=0, use_cache=True)
    finally:
        model.train(was_training)
    new_ids = input_ids.clone()
    new_ids[full_prompt] = sampled[:, :length]
    new_mask = mask.clone()
    new_mask[full_prompt] = 1
    new_labels = labels.clone()
    new_labels[full_prompt] = new_ids[full_prompt]
    new_labels[full_prompt, :prompt] = -100
    return {"input_ids": new_ids, "attention_mask": new_mask, "labels": new_labels}
