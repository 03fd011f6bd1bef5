"""The search space: every enumerated shape is legal and exactly counted, memory is weights +
KV cache, budgets that no shape meets are refused, and depth can drop a contiguous block."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from slimlm.architectures import get_adapter, model_sizes
from slimlm.surgery import Target, plan, prune, save_pruned
from slimlm.search.budget import Budget, fitting, parse_memory
from slimlm.search.candidates import ParameterCounter, SearchSpace, enumerate_shapes
from slimlm.surgery.planning import count_parameters, meta_model, pruned_config

from tiny import ARCHITECTURES, random_scores, tiny_model

# Heads and depth too on the tiny models (the default floors keep all 4 heads and 4 layers), both layer choices.
WIDE = SearchSpace(max_width_prune=0.5, max_depth_prune=0.5, depth_selections=("least_important", "contiguous_block"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unique_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def spread(shapes, count):
    """``count`` shapes spread over the list sorted by size (smallest and largest included)."""
    ordered = sorted(shapes, key=lambda shape: (shape.params, shape.key))
    step = max(1, (len(ordered) - 1) // (count - 1))
    return ordered[::step][: count - 1] + [ordered[-1]]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_enumerated_shapes_are_legal_and_counted_exactly(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    before = model_sizes(model.config)
    shapes = enumerate_shapes(model, WIDE)
    assert len({shape.key for shape in shapes}) == len(shapes)
    axes = {axis: {getattr(s, axis) for s in shapes} for axis in ("hidden_size", "intermediate_size",
                                                                  "num_attention_heads", "num_key_value_heads",
                                                                  "num_layers")}
    assert all(len(values) > 1 for values in axes.values()), axes  # every axis moves
    for shape in shapes:
        assert shape.num_attention_heads % shape.num_key_value_heads == 0
        assert shape.hidden_size >= 0.5 * before["hidden_size"] and shape.num_layers >= 2
    for shape in spread(shapes, 16):  # a full meta model per shape: a sample (the 135M test counts thousands)
        config = pruned_config(model.config, adapter, {**before, **shape.sizes()}, list(range(shape.num_layers)))
        assert count_parameters(meta_model(type(model), config), adapter)["total"] == shape.params, shape.key


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_sampled_shapes_save_and_reload_with_their_counted_size(model_type, tmp_path):
    model = tiny_model(model_type)
    scores = random_scores(model)
    input_ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    for index, shape in enumerate(spread(enumerate_shapes(model, WIDE), 4)):
        pruned = prune(model, scores, shape.target(), inplace=False)
        save_pruned(pruned, tmp_path / str(index))
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / str(index), attn_implementation="eager").eval()
        assert unique_parameters(reloaded) == unique_parameters(pruned) == shape.params, shape.key
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids).logits, pruned(input_ids).logits)


def test_memory_is_weight_bytes_plus_kv_cache():
    model = tiny_model("qwen3")  # tied embeddings: the shared matrix is stored once
    scores = random_scores(model)
    batch, seq = 3, 50
    shapes = enumerate_shapes(model, WIDE, memory_at=(batch, seq), dtype=torch.bfloat16)
    for shape in spread(shapes, 3):
        pruned = prune(model, scores, shape.target(), inplace=False).to(torch.bfloat16)
        weight_bytes = sum(p.numel() * p.element_size() for p in pruned.parameters())
        config = pruned.config
        kv_bytes = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * batch * seq * 2
        assert shape.memory_bytes == weight_bytes + kv_bytes


def test_smollm2_sized_config_enumerates_thousands_of_shapes_in_seconds():
    # SmolLM2-135M's shape (from its GGUF config), on the meta device: no weights.
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, num_hidden_layers=30, tie_word_embeddings=True, head_dim=64)
    model = meta_model(LlamaForCausalLM, config)
    start = time.perf_counter()
    counter = ParameterCounter(model)
    space = SearchSpace(depth_selections=("least_important", "contiguous_block"))
    shapes = enumerate_shapes(model, space, memory_at=(8, 4096), dtype=torch.bfloat16, counter=counter)
    seconds = time.perf_counter() - start
    assert len(shapes) > 3000 and seconds < 20, (len(shapes), seconds)
    assert counter.builds < 200  # per-axis caching: a meta model per width, not per shape
    total = count_parameters(model, get_adapter(model))["total"]
    _, meeting = fitting(shapes, Budget(target_params=0.5), total)
    assert meeting and all(0.45 * total <= s.params <= 0.5 * total + 1 for s in meeting)
    assert [s.params for s in meeting] == sorted((s.params for s in meeting), reverse=True)
    for shape in spread(shapes, 5):
        sizes = {**model_sizes(config), **shape.sizes()}
        adapter = get_adapter(model)
        counted = count_parameters(meta_model(LlamaForCausalLM, pruned_config(config, adapter, sizes,
                                                                              list(range(shape.num_layers)))), adapter)
        assert counted["total"] == shape.params
        assert shape.hidden_size % shape.num_attention_heads == 0  # Llama's validation rule


def test_budgets_no_shape_meets_are_refused_with_the_smallest_reachable_size():
    model = tiny_model("llama")
    shapes = enumerate_shapes(model)
    total = unique_parameters(model)
    with pytest.raises(ValueError, match="smallest the search space allows is"):
        fitting(shapes, Budget(target_params=0.1), total)
    with pytest.raises(ValueError, match="within tolerance"):
        fitting(shapes, Budget(target_params=min(s.params for s in shapes) + 1, tolerance=1e-9), total)
    with pytest.raises(ValueError, match="at_batch and at_seq"):
        Budget(target_memory="1GiB", at_batch=8).check()
    with pytest.raises(ValueError, match="exactly one"):
        Budget().check()
    with pytest.raises(ValueError, match="unknown search target"):
        Budget.coerce({"target_param": 0.5})
    with pytest.raises(ValueError, match="only as a budget"):
        Budget.coerce(Target(hidden_size=32, target_params=0.5))
    with pytest.raises(ValueError, match="min_sizes"):
        enumerate_shapes(model, SearchSpace(min_sizes={"heads": 1}))


def test_memory_sizes_parse():
    assert parse_memory("1.5GiB") == 1.5 * 2**30
    assert parse_memory("800MB") == 800 * 10**6
    assert parse_memory("2G") == 2 * 2**30
    assert parse_memory(1000) == 1000
    for bad in ("lots", "1.5 parsecs", -1, True):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_depth_selection_drops_the_least_important_contiguous_block():
    model = tiny_model("llama")
    scores = random_scores(model)
    # Least important one by one: layers 0 and 2; the cheapest block of two: 2-3.
    scores.scores["block_influence.layer"] = torch.tensor([0.1, 0.9, 0.2, 0.3])
    for selection, kept in (("least_important", [1, 3]), ("contiguous_block", [0, 1])):
        target = Target(num_layers=2, depth_selection=selection)
        assert "contiguous block" in plan(model, target).table() or selection == "least_important"
        pruned = prune(model, scores, target, inplace=False)
        assert pruned.slimlm_prune_record["kept_layers"] == kept
        assert pruned.slimlm_prune_record["plan"]["depth_selection"] == selection
    with pytest.raises(ValueError, match="depth_selection"):
        plan(model, Target(num_layers=2, depth_selection="middle"))
