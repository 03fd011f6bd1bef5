"""prune(..., reconstruct=...): o_proj/down_proj refitted to the heads and neurons that stay."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.architectures import get_adapter, model_sizes
from slimlm.surgery import prune, reconstruction_stats, save_pruned
from slimlm.surgery.reconstruct import refit_columns

from tiny import ARCHITECTURES, assert_untouched, calibration, random_scores, snapshot, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WIDTH = dict(intermediate_size=40, num_attention_heads=2, drop_layers=[1])


def _objective(weight, inputs, keep, refit, damping):
    return ((inputs @ weight.T - inputs[:, keep] @ refit.T) ** 2).sum() + damping * ((refit - weight[:, keep]) ** 2).sum()


def test_refit_is_the_regularised_least_squares_minimum():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(300, 12, generator=generator, dtype=torch.float64)
    weight = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    keep = torch.tensor([0, 3, 4, 8, 11])
    gram = inputs.T @ inputs
    ridge = 0.3
    refit = refit_columns(weight, gram, keep, ridge)
    damping = ridge * gram[keep][:, keep].diagonal().mean()
    # The minimum of a strictly convex quadratic: its gradient vanishes and no nudge does better.
    refit.requires_grad_(True)
    _objective(weight, inputs, keep, refit, damping).backward()
    assert refit.grad.abs().max() < 1e-8 * gram.abs().max()
    best = _objective(weight, inputs, keep, refit.detach(), damping)
    for _ in range(5):
        nudged = refit.detach() + 1e-3 * torch.randn(refit.shape, generator=generator, dtype=torch.float64)
        assert _objective(weight, inputs, keep, nudged, damping) > best
    # A huge ridge keeps the original columns (plain pruning).
    torch.testing.assert_close(refit_columns(weight, gram, keep, 1e9), weight[:, keep], rtol=1e-6, atol=1e-6)


def test_dropped_inputs_that_the_kept_ones_explain_are_folded_in_exactly():
    """When a pruned input is a fixed mix of kept ones, the full fit reproduces the output."""
    generator = torch.Generator().manual_seed(1)
    kept = torch.randn(400, 6, generator=generator, dtype=torch.float64)
    mix = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    inputs = torch.cat([kept, kept @ mix], dim=1)
    weight = torch.randn(4, 9, generator=generator, dtype=torch.float64)
    refit = refit_columns(weight, inputs.T @ inputs, torch.arange(6), 1e-12)
    torch.testing.assert_close(kept @ refit.T, inputs @ weight.T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_reconstruction_brings_every_pruned_projection_closer(model_type, tmp_path):
    """On every family: on the calibration tokens, each kept layer's o_proj and down_proj output
    (fed the source's inputs) is closer to the source's than plain pruning leaves it; the result
    saves, reloads with the same logits and records the compensation."""
    model = tiny_model(model_type)
    input_ids, mask = calibration(batch=6, seq=16, seed=2, pad_from={1: 9})
    blocks = {"input_ids": input_ids, "attention_mask": mask}
    stats = reconstruction_stats(model, blocks, batch_size=4)
    assert stats.tokens == int(mask.sum())
    before = snapshot(model)
    scores = random_scores(model)
    plain = prune(model, scores, WIDTH, inplace=False)
    refitted = prune(model, scores, WIDTH, inplace=False, reconstruct=stats)
    assert_untouched(model, before)  # inplace=False: the source stays as it was

    adapter = get_adapter(model)
    sizes = model_sizes(model.config)
    kept_layers = refitted.slimlm_prune_record["kept_layers"]
    assert kept_layers == plain.slimlm_prune_record["kept_layers"]
    changed = 0
    for new_index, old_index in enumerate(kept_layers):
        source_layer = adapter.layers(model)[old_index]
        for part, gram_key in ((lambda l: adapter.attention(l).o, "o"), (lambda l: adapter.mlp(l).down, "down")):
            weight = part(source_layer).weight.detach().double()
            gram = stats.grams[f"{gram_key}.{old_index}"]
            keep = _kept_inputs(weight, part(adapter.layers(plain)[new_index]).weight.detach().double())
            if keep is None:
                continue

            def error(columns):  # Σ_tokens ||W a − V a_S||² from the Gram matrix
                full = torch.zeros_like(weight)
                full[:, keep] = columns
                delta = weight - full
                return float(torch.einsum("oi,ij,oj->", delta, gram, delta))

            plain_error = error(part(adapter.layers(plain)[new_index]).weight.detach().double())
            refit_error = error(part(adapter.layers(refitted)[new_index]).weight.detach().double())
            assert refit_error <= plain_error * (1 + 1e-5), (gram_key, old_index)
            changed += refit_error < plain_error * 0.999
    assert changed >= len(kept_layers)  # at least one projection per layer really moved
    assert sizes["num_layers"] - len(kept_layers) == 1

    record = refitted.slimlm_prune_record["reconstruct"]
    assert record == {"tokens": stats.tokens, "ridge": 1.0, "calibration": stats.digest}
    input_ids = input_ids[:1]
    with torch.no_grad():
        expected = refitted(input_ids).logits
    save_pruned(refitted, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, expected)
    saved = json.loads((tmp_path / "out" / "slimlm_prune.json").read_text())
    assert saved["reconstruct"] == record


def _kept_inputs(source: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor | None:
    """Which source input columns a plainly pruned projection kept (its columns are copies), or
    None when none was pruned. Rows may have been pruned too (hidden channels): not in WIDTH."""
    if pruned.shape[1] == source.shape[1]:
        return None
    matches = [int((source - column[:, None]).abs().sum(0).argmin()) for column in pruned.T]
    return torch.tensor(matches)


def test_reconstruction_refits_exactly_the_selected_columns():
    model = tiny_model("llama")
    stats = reconstruction_stats(model, calibration(batch=4, seq=16, seed=3)[0], batch_size=4)
    scores = random_scores(model)
    refitted = prune(model, scores, {"intermediate_size": 40}, inplace=False, reconstruct=stats)
    from slimlm.surgery.selection import select_units

    sizes = model_sizes(model.config)
    selection = select_units(scores, sizes, {**sizes, "intermediate_size": 40}, None)
    for index, layer in enumerate(model.model.layers):
        keep = selection.neurons[index]
        expected = refit_columns(layer.mlp.down_proj.weight, stats.grams[f"down.{index}"], keep, stats.ridge)
        torch.testing.assert_close(refitted.model.layers[index].mlp.down_proj.weight, expected)
        # attention untouched: no head was pruned
        torch.testing.assert_close(refitted.model.layers[index].self_attn.o_proj.weight, layer.self_attn.o_proj.weight)


def test_statistics_of_another_model_or_a_bad_ridge_are_refused_before_any_change():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=5)
    stats = reconstruction_stats(other, calibration(batch=2, seq=8)[0], batch_size=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="computed on another model"):
        prune(model, random_scores(model), {"intermediate_size": 40}, reconstruct=stats)
    assert_untouched(model, before)
    for ridge in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
            reconstruction_stats(model, calibration(batch=2, seq=8)[0], ridge=ridge)
    with pytest.raises(ValueError, match="holds no token"):
        reconstruction_stats(model, {"input_ids": torch.ones(2, 4, dtype=torch.long),
                                     "attention_mask": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"token ids must be in \[0, "):
        reconstruction_stats(model, torch.full((2, 4), 10**6))
