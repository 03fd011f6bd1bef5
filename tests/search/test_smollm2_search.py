"""The real model: architecture search on SmolLM2-135M-Instruct at half its parameters, with a
small N, K and token budget (a smoke run of every phase and its timing, not the benchmark of
issue 13, which compares the searched and greedy students after equal distillation).

Calibration text as in ``test_smollm2`` (standard-library docstrings). Results go to
``.benchmarks/smollm2_search.json``.
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from slimlm import search
from slimlm.data import TokenBlocks
from slimlm.importance import estimate_importance
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path
from slimlm.surgery import plan

from tests.surgery.test_smollm2 import CALIBRATION_MODULES, docstring_text, token_blocks

RESULTS = os.path.join(".benchmarks", "smollm2_search.json")


@pytest.mark.slow
def test_smollm2_search_at_half_the_parameters(tmp_path):
    torch.manual_seed(0)
    path = smollm2_gguf_path()
    model, tokenizer = load_model(path), load_tokenizer(path)
    ids = token_blocks(tokenizer, docstring_text(CALIBRATION_MODULES), 48)
    blocks = TokenBlocks(ids, torch.ones_like(ids))
    start = time.perf_counter()
    scores = estimate_importance(model, blocks, depth=("block_influence",), batch_size=8, progress=False)
    results = {"scores_seconds": round(time.perf_counter() - start, 1)}

    result = search(model, scores, {"target_params": 0.5}, blocks, out=tmp_path / "search", top_n=4, top_k=2,
                    held_out=8, rerank_tokens=8 * 256, batch_size=8)
    greedy = plan(model, {"target_params": 0.5}).sizes_after
    results.update(num_enumerated=result.num_enumerated, num_meeting=result.num_meeting,
                   phase_seconds=result.phase_seconds, winner=result.winner, candidates=result.candidates,
                   greedy_plan={k: greedy[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                       "num_key_value_heads", "num_layers")})
    assert result.num_enumerated > 1000 and result.num_meeting >= 4
    assert all(math.isfinite(row["zero_shot_kd_loss"]) for row in result.candidates)
    assert 0.45 <= result.winner["params"] / sum(p.numel() for p in model.parameters()) <= 0.5
    assert sum(p.numel() for p in result.student.parameters()) == result.winner["params"]
    assert all(row["distill_loss"] < row["zero_shot_kd_loss"] for row in result.candidates[:2])
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as handle:
        json.dump(results, handle, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str))
