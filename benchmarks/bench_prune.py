"""Prune + save of a ~1B-parameter Llama-shaped random model against plain ``save_pretrained``
of the same model, in one run.

Targets (issue 5): prune + save ≤ 1.5× the plain save's time, and peak RSS ≤ 1.3× the model's
size, i.e. at most 0.3× the model above the resident model while pruning and saving.
Shape: TinyLlama-1.1B (hidden 2048, MLP 5632, 22 layers, 32 query / 4 KV heads, vocab 32000)
in bfloat16, pruned to half its parameters by the budget planner with random scores (the
work does not depend on the score values). ``SLIMLM_BENCH_QUICK=1``: a ~10M model.

    .venv/bin/python -m pytest -q benchmarks/bench_prune.py --benchmark-only -s
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import QUICK, peak_bytes_above_current, record_row
from slimlm.importance.scores import ImportanceScores, model_fingerprint
from slimlm.surgery import prune, save_pruned

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000)
SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=8192)
DTYPE = torch.bfloat16
ROUNDS = 3
TARGET = {"target_params": 0.5}


def random_llama(shape: dict):
    """A model of ``shape`` with random weights, built without transformers' slow init."""
    config = LlamaConfig(**shape, tie_word_embeddings=False, dtype=DTYPE)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float32) * 0.02)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq = torch.ones(
        config.head_dim // 2)  # to_empty left them unset; values are irrelevant to saving
    return model.eval()


def random_scores(model) -> ImportanceScores:
    config = model.config
    layers = config.num_hidden_layers
    return ImportanceScores(
        scores={"random.head": torch.rand(layers, config.num_attention_heads),
                "random.neuron": torch.rand(layers, config.intermediate_size),
                "random.hidden": torch.rand(config.hidden_size),
                "random.layer": torch.rand(layers)},
        meta={"fingerprint": model_fingerprint(model)},
    )


@pytest.mark.benchmark(group="prune")
def test_prune_and_save_vs_save_pretrained(benchmark, tmp_path):
    shape = SMALL if QUICK else FULL
    model = random_llama(shape)
    scores = random_scores(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    shape_text = "x".join(str(shape[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    plain_dir, pruned_dir = tmp_path / "plain", tmp_path / "pruned"

    def plain_save():
        shutil.rmtree(plain_dir, ignore_errors=True)
        model.save_pretrained(plain_dir)

    prune_seconds, save_seconds, plain_times = [], [], []

    def prune_and_save(working):
        start = time.perf_counter()
        prune(working, scores, TARGET)
        middle = time.perf_counter()
        save_pruned(working, pruned_dir, overwrite=True)
        prune_seconds.append(middle - start)
        save_seconds.append(time.perf_counter() - middle)

    def settle():
        # Flush the previous round's dirty pages so neither provider pays for the other's
        # writeback (the kernel throttles writers once too much unwritten data piles up).
        os.sync()

    def plain_round_then_copy():
        # Rounds alternate: a plain save (timed here), then a fresh copy for prune + save.
        settle()
        start = time.perf_counter()
        plain_save()
        plain_times.append(time.perf_counter() - start)
        shutil.rmtree(plain_dir)
        working = copy.deepcopy(model)
        settle()
        return (working,), {}

    plain_save()  # warm-up: transformers compiles its save-time regexes once per process
    benchmark.pedantic(prune_and_save, setup=plain_round_then_copy, rounds=ROUNDS, iterations=1)
    ours_seconds = benchmark.stats.stats.median
    plain_seconds = statistics.median(plain_times)
    settle()
    plain_peak = peak_bytes_above_current(plain_save)
    shutil.rmtree(plain_dir)
    working = copy.deepcopy(model)
    settle()
    ours_peak = peak_bytes_above_current(lambda: prune_and_save(working))
    pruned_params = sum(p.numel() for p in working.parameters())
    del working

    time_ratio = ours_seconds / plain_seconds
    rss_ratio = (model_bytes + ours_peak) / model_bytes
    for provider, metric, value, unit in [
        ("save_pretrained", "median_time", plain_seconds, "s"),
        ("slimlm.prune+save_pruned", "median_time", ours_seconds, "s"),
        ("slimlm.prune", "median_time", statistics.median(prune_seconds), "s"),
        ("slimlm.save_pruned", "median_time", statistics.median(save_seconds), "s"),
        ("save_pretrained", "peak_rss_above_model", plain_peak / model_bytes, "x_model"),
        ("slimlm.prune+save_pruned", "peak_rss_above_model", ours_peak / model_bytes, "x_model"),
        ("slimlm.prune+save_pruned", "time_vs_plain_save", time_ratio, "x"),
        ("slimlm.prune+save_pruned", "peak_rss_vs_model", rss_ratio, "x_model"),
    ]:
        record_row("prune_save", provider, shape_text, DTYPE, metric, value, unit)
    params_before = sum(p.numel() for p in model.parameters())
    benchmark.extra_info.update(model_bytes=model_bytes, params_before=params_before, params_after=pruned_params,
                                plain_seconds=plain_seconds, time_ratio=time_ratio, rss_ratio=rss_ratio,
                                plain_peak_ratio=plain_peak / model_bytes)
    print(f"\nmodel {model_bytes / 2**30:.2f} GiB ({shape_text}, {DTYPE}); params after {pruned_params:,}\n"
          f"save_pretrained: {plain_seconds:.2f} s, peak +{plain_peak / 2**30:.2f} GiB\n"
          f"prune+save_pruned: {ours_seconds:.2f} s ({time_ratio:.2f}x; "
          f"prune {statistics.median(prune_seconds):.2f} s, save {statistics.median(save_seconds):.2f} s), peak +{ours_peak / 2**30:.2f} GiB "
          f"(peak RSS {rss_ratio:.2f}x the model)")
    if not QUICK:  # the small model's times are dominated by fixed costs
        assert time_ratio <= 1.5
        assert rss_ratio <= 1.3
