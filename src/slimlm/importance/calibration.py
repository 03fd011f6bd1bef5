"""Calibration data for scoring: batches cut from tensors or taken from an iterable, checked
against the model before they run."""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def check_batch(batch: dict, vocab_size: int, max_len: int | None, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError(f"calibration batch {index} must be a dict with 'input_ids' (and 'attention_mask')")
    input_ids = batch["input_ids"]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"calibration batch {index}: input_ids must be an integer (batch, seq) tensor")
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    if tuple(mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"calibration batch {index}: attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size):
        raise ValueError(f"calibration batch {index}: token ids must be in [0, {vocab_size}) (the model's vocab_size)")
    if max_len is not None and input_ids.shape[1] > max_len:
        raise ValueError(
            f"calibration batch {index}: sequence length {input_ids.shape[1]} is above the model's limit "
            f"(max_position_embeddings = {max_len})"
        )
    return input_ids, mask


def batches(calibration, batch_size: int, num_samples: int | None) -> Iterator[dict]:
    """Batches of at most ``num_samples`` samples in all: tensors are cut into ``batch_size`` rows,
    iterables of batch dicts are used as given (the last one trimmed)."""
    if hasattr(calibration, "input_ids") and hasattr(calibration, "attention_mask"):  # slimlm.data.TokenBlocks
        calibration = {"input_ids": calibration.input_ids, "attention_mask": calibration.attention_mask}
    if isinstance(calibration, torch.Tensor):
        calibration = {"input_ids": calibration}
    if isinstance(calibration, dict):
        input_ids = calibration.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("calibration tensor must be a (samples, seq) LongTensor of token ids")
        mask = calibration.get("attention_mask")
        total = input_ids.shape[0] if num_samples is None else min(num_samples, input_ids.shape[0])
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            yield {
                "input_ids": input_ids[start:stop],
                "attention_mask": mask[start:stop] if mask is not None else None,
            }
        return
    if not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be a LongTensor or an iterable of batches, got {type(calibration).__name__}")
    seen = 0
    for batch in calibration:
        if num_samples is not None and seen >= num_samples:
            return
        if isinstance(batch, dict) and num_samples is not None and isinstance(batch.get("input_ids"), torch.Tensor):
            keep = num_samples - seen
            batch = {key: value[:keep] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
        seen += batch["input_ids"].shape[0] if isinstance(batch, dict) and "input_ids" in batch else 1
        yield batch
