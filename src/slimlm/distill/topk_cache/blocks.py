"""A top-k cache's sequences as training blocks: ``PackedTopKBlocks`` cuts the cache's token
stream (its sequences one after another, as the writer stored them) into blocks of ``seq_len``
tokens, so sequences of any length (the teacher's own generations) train without padding. The
one target in each block that would cross from one sequence into the next (the teacher's
distribution after a sequence's last token, paired with the next sequence's first token) is
masked: the label of every token that begins a sequence is -100."""
from __future__ import annotations

import torch

from slimlm.distill.topk_cache.reader import TeacherTopKCache, load_teacher_topk


class PackedTopKBlocks(torch.utils.data.Dataset):
    """Map-style blocks of a top-k cache, read and decoded when asked (the cache stays on disk):
    item i is tokens [i · seq_len, (i + 1) · seq_len) of the stream with ``input_ids``,
    ``attention_mask``, ``labels`` and the cached ``topk_logprobs``/``topk_indices`` of each
    position. A last partial block is dropped. ``cache``: a ``TeacherTopKCache`` or its folder."""

    def __init__(self, cache, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.cache = cache if isinstance(cache, TeacherTopKCache) else load_teacher_topk(cache)
        self.seq_len = seq_len
        self.num_blocks = self.cache.num_tokens // seq_len
        if self.num_blocks == 0:
            raise ValueError(f"the top-k cache {self.cache.path} holds {self.cache.num_tokens} tokens: fewer than "
                             f"one block of {seq_len}")

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_blocks:
            raise IndexError(index)
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        ids = self.cache.tokens(start, stop)
        logprobs, indices = self.cache.read(start, stop)
        labels = ids.clone()
        labels[torch.from_numpy(self.cache.sequence_starts(start, stop) - start)] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                "topk_logprobs": logprobs, "topk_indices": indices}
