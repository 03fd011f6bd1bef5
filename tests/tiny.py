"""Tiny models and tokenizers built from configs, so tests download nothing."""
from __future__ import annotations

import os
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = (
    "the a model small large teacher student layer head neuron prune distill text data token "
    "is was will be of to and in on with for it this that we they run fast slow good bad"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS with <pad>=0, <eos>=1, <unk>=2."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS + [".", ",", "!", "?"]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return tokenizer


def tiny_llama(vocab_size: int = 64, seed: int = 0, **overrides) -> LlamaForCausalLM:
    config = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def token_dataset(vocab_size: int, num: int, seq: int, seed: int, max_pad: int = 3) -> list[dict]:
    """Random training examples (input_ids, attention_mask, labels = ids with -100 on padding),
    each right-padded with 0..max_pad pad tokens (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(num):
        ids = torch.randint(3, vocab_size, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        pad = int(torch.randint(0, max_pad + 1, (), generator=gen))
        if pad:
            ids[-pad:] = 0
            mask[-pad:] = 0
        items.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return items


def exit_distributed() -> None:
    """End a distributed test worker whose results are written: every rank finishes before any
    tears down, then the process exits without interpreter teardown, where a still-joinable
    gloo/accelerate thread aborts it now and then (as ``slimlm.cli.entry`` does)."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
