"""prune/plan/save_pruned on every registered architecture (tiny random models)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.fingerprint import model_fingerprint
from slimlm.importance import estimate_importance
from slimlm.importance.scores import ImportanceScores
from slimlm.surgery import Target, plan, prune, save_pruned
from slimlm.architectures import model_sizes

from tiny import ARCHITECTURES, TINY_CONFIGS, assert_untouched, random_scores, snapshot, tiny_config, tiny_model

# One case per axis alone, plus all together; explicit sizes of the tiny models (see tests/tiny.py).
CASES = {
    "hidden": dict(hidden_size=48),
    "neuron": dict(intermediate_size=40),
    "head": dict(num_attention_heads=2),  # one query head per KV group left
    "kv_group": dict(num_attention_heads=2, num_key_value_heads=1),  # a whole KV group goes
    "layer": dict(num_layers=2),  # chosen by the layer scores
    "all": dict(hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                drop_layers=[0, 2]),
}


@pytest.fixture
def input_ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(7))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_every_architecture_has_a_tiny_config():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_identity_pruning_is_bit_identical(model_type, input_ids):
    model = tiny_model(model_type)
    expected = logits(model, input_ids)
    sizes = model_sizes(model.config)
    target = {k: sizes[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                    "num_layers")}
    prune(model, random_scores(model), target)
    assert torch.equal(logits(model, input_ids), expected)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruned_model_saves_reloads_and_generates(model_type, case, input_ids, tmp_path):
    model = tiny_model(model_type)
    tied_before = model.lm_head.weight is model.get_input_embeddings().weight
    embedding = model.get_input_embeddings()
    pruned_plan = plan(model, CASES[case])
    assert prune(model, random_scores(model), pruned_plan) is model
    assert model.get_input_embeddings() is embedding  # sliced in place, not rebuilt
    for name, value in pruned_plan.sizes_after.items():
        assert model_sizes(model.config)[name] == value, name
    assert sum(p.numel() for p in model.parameters()) == pruned_plan.params_after["total"]
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied_before
    expected = logits(model, input_ids)

    save_pruned(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, input_ids), expected)
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tied_before
    layers = reloaded.model.layers
    assert [layer.self_attn.layer_idx for layer in layers] == list(range(len(layers)))

    prompt = input_ids[:1, :6]
    outputs = [reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                                 use_cache=use_cache, pad_token_id=0) for use_cache in (True, False)]
    assert outputs[0].shape[1] > prompt.shape[1]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_estimated_scores_prune_every_axis_and_reload(model_type, input_ids, tmp_path):
    """The pipeline on every family: scored by every metric, pruned by each metric's scores on
    every axis, saved, and reloaded by stock transformers with the same logits."""
    model = tiny_model(model_type)
    calibration = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    scores = estimate_importance(model, calibration, metrics=("activation", "wanda", "magnitude"), progress=False)
    for metric in ("activation", "wanda", "magnitude"):
        metric_scores = ImportanceScores(
            scores={key: value for key, value in scores.scores.items() if key.startswith((f"{metric}.", "loss_drop."))},
            meta=scores.meta,
        )
        pruned = prune(model, metric_scores, {**CASES["all"], "drop_layers": None, "num_layers": 2}, inplace=False)
        expected = logits(pruned, input_ids)
        save_pruned(pruned, tmp_path / metric)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / metric, attn_implementation="eager").eval()
        assert type(reloaded) is type(model)
        torch.testing.assert_close(logits(reloaded, input_ids), expected)


def _zero_and_rank(model, axis: str, scores: ImportanceScores):
    """Zero the weights through which some units of ``axis`` reach the output and give those
    units the lowest scores, so pruning must remove exactly them."""
    from slimlm.surgery import get_adapter

    adapter = get_adapter(model)
    sizes = model_sizes(model.config)
    head_dim, group = sizes["head_dim"], sizes["num_attention_heads"] // sizes["num_key_value_heads"]
    layers = adapter.layers(model)
    with torch.no_grad():
        if axis == "hidden":
            channels = torch.tensor([5, 17, 40, 63])
            adapter.embedding(model).weight[:, channels] = 0
            for layer in layers:
                adapter.attention(layer).o.weight[channels] = 0
                adapter.mlp(layer).down.weight[channels] = 0
            scores.scores["magnitude.hidden"][channels] = -1.0
            return {"hidden_size": sizes["hidden_size"] - 4}
        if axis == "neuron":
            for index, layer in enumerate(layers):
                neurons = torch.tensor([index, 50 + index, 95 - index])
                adapter.mlp(layer).down.weight[:, neurons] = 0
                scores.scores["magnitude.neuron"][index, neurons] = -1.0
            return {"intermediate_size": sizes["intermediate_size"] - 3}
        if axis in ("head", "kv_group"):
            for index, layer in enumerate(layers):
                if axis == "head":  # one query head in every KV group, different per layer
                    heads = torch.tensor([g * group + (index + g) % group for g in range(sizes["num_key_value_heads"])])
                else:
                    kv = index % sizes["num_key_value_heads"]
                    heads = torch.arange(kv * group, (kv + 1) * group)
                    scores.scores["magnitude.kv_group"][index, kv] = -1.0
                columns = (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
                adapter.attention(layer).o.weight[:, columns] = 0
                scores.scores["magnitude.head"][index, heads] = -1.0
            if axis == "head":
                return {"num_attention_heads": sizes["num_attention_heads"] - sizes["num_key_value_heads"]}
            return {"num_attention_heads": sizes["num_attention_heads"] - group,
                    "num_key_value_heads": sizes["num_key_value_heads"] - 1}
        if axis == "layer":
            for index in (1, 2):
                adapter.attention(layers[index]).o.weight.zero_()
                adapter.mlp(layers[index]).down.weight.zero_()
                scores.scores["block_influence.layer"][index] = -1.0
            return {"num_layers": sizes["num_layers"] - 2}
    raise AssertionError(axis)


@pytest.mark.parametrize("axis", ["hidden", "neuron", "head", "kv_group", "layer"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_pruning_zeroed_units_keeps_outputs(model_type, axis, input_ids):
    model = tiny_model(model_type)
    scores = random_scores(model)
    target = _zero_and_rank(model, axis, scores)
    scores.meta["fingerprint"] = model_fingerprint(model)  # the hidden case zeroed embedding rows
    expected = logits(model, input_ids)
    prune(model, scores, target)
    # Not bit-exact where hidden channels go: RMSNorm's eps now sits beside a mean over fewer
    # channels (a relative change of eps·(1 − kept/before) / mean(x²)). A wrong index costs O(1).
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("model_type", ["qwen2", "gemma2"])
def test_per_layer_settings_follow_dropped_layers(model_type, tmp_path):
    model = tiny_model(model_type)
    layer_types = list(model.config.layer_types)
    prune(model, None, {"drop_layers": [0, 3]})
    assert model.config.layer_types == [layer_types[1], layer_types[2]]
    if model_type == "qwen2":
        assert model.config.max_window_layers == 1  # of the kept layers 1, 2 only layer 1 was below 2
    save_pruned(model, tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as handle:
        saved = json.load(handle)
    assert saved["layer_types"] == [layer_types[1], layer_types[2]]
    assert saved["num_hidden_layers"] == 2
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert [layer.self_attn.sliding_window for layer in reloaded.model.layers] == \
        [layer.self_attn.sliding_window for layer in model.model.layers]


def test_output_loads_in_a_clean_process_with_stock_transformers(input_ids, tmp_path):
    """No state of this process (adapters, patches) may be needed to load the checkpoint."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    model = tiny_model("gemma2")  # scaled embeddings, tied head, four norms per layer
    prune(model, random_scores(model), CASES["all"])
    save_pruned(model, tmp_path / "out")
    save_file({"input_ids": input_ids}, str(tmp_path / "inputs.safetensors"))
    child = (
        "import sys, torch\n"
        "from safetensors.torch import load_file, save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], attn_implementation='eager').eval()\n"
        "ids = load_file(sys.argv[2])['input_ids']\n"
        "with torch.no_grad():\n"
        "    save_file({'logits': model(ids).logits}, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", child, str(tmp_path / "out"), str(tmp_path / "inputs.safetensors"),
                    str(tmp_path / "logits.safetensors")], check=True, cwd=tmp_path)
    torch.testing.assert_close(load_file(str(tmp_path / "logits.safetensors"))["logits"], logits(model, input_ids))


def test_whole_kv_groups_need_only_group_scores(input_ids):
    model = tiny_model("qwen2")
    scores = random_scores(model)
    del scores.scores["magnitude.head"]
    scores.scores["magnitude.kv_group"][:, 0] = -1.0  # group 0 goes in every layer
    kept_o = [layer.self_attn.o_proj.weight[:, 32:].clone() for layer in model.model.layers]
    prune(model, scores, {"num_attention_heads": 2, "num_key_value_heads": 1})
    for layer, expected in zip(model.model.layers, kept_o):
        assert torch.equal(layer.self_attn.o_proj.weight, expected)


def test_head_dim_written_when_it_no_longer_follows(tmp_path):
    model = tiny_model("llama")
    prune(model, random_scores(model), {"num_attention_heads": 2})
    save_pruned(model, tmp_path / "out")
    with open(tmp_path / "out" / "config.json") as handle:
        saved = json.load(handle)
    assert saved["head_dim"] == 16 and saved["hidden_size"] // saved["num_attention_heads"] == 32


# --- planning ---------------------------------------------------------------------------------

def test_budget_planner_prunes_mlp_first_then_hidden():
    model = tiny_model("mistral")
    total = sum(p.numel() for p in model.parameters())
    light = plan(model, {"target_params": 0.9})
    assert light.sizes_after["intermediate_size"] < 96
    assert {k: light.sizes_after[k] for k in ("hidden_size", "num_attention_heads", "num_layers")} == \
        {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 4}
    assert light.params_after["total"] <= 0.9 * total
    heavy = plan(model, {"target_params": 0.55})
    # The floor is a quarter (24); 96 has too few multiples of 64 or 32 below it, so the grid
    # is multiples of 16 and its smallest value above the floor is 32.
    assert heavy.sizes_after["intermediate_size"] == 32
    assert heavy.sizes_after["hidden_size"] < 64
    assert heavy.params_after["total"] <= round(0.55 * total)
    table = heavy.table()
    assert "intermediate_size" in table and "params.total" in table


def test_budget_planner_respects_explicit_sizes_and_minimums():
    model = tiny_model("qwen3")
    fixed = plan(model, {"target_params": 0.6, "intermediate_size": 96})
    assert fixed.sizes_after["intermediate_size"] == 96 and fixed.sizes_after["hidden_size"] < 64
    with pytest.raises(ValueError, match="cannot reach"):
        plan(model, {"target_params": 0.6, "min_intermediate_size": 96, "min_hidden_size": 64,
                     "min_num_attention_heads": 4, "min_num_layers": 4})


def test_budget_planner_keeps_llama_hidden_divisible_by_heads():
    model = tiny_model("llama", num_attention_heads=3, num_key_value_heads=1, head_dim=16, hidden_size=48)
    chosen = plan(model, {"target_params": 0.7})
    assert chosen.sizes_after["hidden_size"] % chosen.sizes_after["num_attention_heads"] == 0


@pytest.mark.parametrize("text, expected", [("70M", 70_000_000), ("1.5B", 1_500_000_000), ("500k", 500_000),
                                            ("12_000", 12_000)])
def test_parse_param_count(text, expected):
    from slimlm.surgery.planning import parse_param_count

    assert parse_param_count(text, 10**9) == expected


def test_plan_with_budget_equal_to_model_is_identity():
    model = tiny_model("llama")
    chosen = plan(model, Target(target_params=1.0))
    assert chosen.sizes_after == chosen.sizes_before


# --- bad input: clear errors, source untouched ---------------------------------------------------

BAD_TARGETS = {
    "larger hidden": ({"hidden_size": 128}, "larger than the model"),
    "larger budget": ({"target_params": "1B"}, "larger than the model"),
    "heads not divisible": ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
    "group grows": ({"num_attention_heads": 4, "num_key_value_heads": 1}, "query heads per KV group"),
    "zero hidden": ({"hidden_size": 0}, "at least one"),
    "zero neurons": ({"intermediate_size": 0}, "at least one"),
    "zero heads": ({"num_attention_heads": 0}, "at least one"),
    "zero kv": ({"num_key_value_heads": 0}, "at least one"),
    "zero layers": ({"num_layers": 0}, "at least one"),
    "drop every layer": ({"drop_layers": [0, 1, 2, 3]}, "at least one must remain"),
    "drop out of range": ({"drop_layers": [4]}, "out of range"),
    "unknown field": ({"hidden": 32}, "unknown target field"),
    "transformers rejects": ({"hidden_size": 50}, "transformers rejects"),
}


@pytest.mark.parametrize("case", BAD_TARGETS)
def test_bad_target_is_refused_and_model_untouched(case):
    model = tiny_model("llama")
    before = snapshot(model)
    target, message = BAD_TARGETS[case]
    with pytest.raises(ValueError, match=message):
        prune(model, random_scores(model), target)
    assert_untouched(model, before)


def test_scores_from_another_model_are_refused():
    model, other = tiny_model("llama"), tiny_model("llama", seed=3)
    before = snapshot(model)
    with pytest.raises(ValueError, match="not on this model"):
        prune(model, random_scores(other), {"hidden_size": 32})
    assert_untouched(model, before)


@pytest.mark.parametrize("problem", ["missing axis", "wrong shape", "nan"])
def test_bad_scores_are_refused(problem):
    model = tiny_model("qwen2")
    scores = random_scores(model)
    if problem == "missing axis":
        del scores.scores["magnitude.neuron"]
    elif problem == "wrong shape":
        scores.scores["magnitude.neuron"] = torch.rand(4, 95)
    else:
        scores.scores["magnitude.neuron"][1, 3] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match="neuron"):
        prune(model, scores, {"intermediate_size": 32})
    assert_untouched(model, before)


def test_unsupported_model_type_names_the_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*architectures/gpt2\.py"):
        plan(model, {"hidden_size": 16})


def test_a_broken_adapter_is_disabled_instead_of_breaking_import(monkeypatch):
    from types import SimpleNamespace

    from slimlm import architectures

    # As if transformers had renamed a class an adapter imports.
    monkeypatch.setattr(architectures, "_MODULES", {"no_such_adapter_module": ("renamed_arch",)})
    monkeypatch.setattr(architectures, "_DISABLED", {})
    with pytest.warns(UserWarning, match="adapter 'no_such_adapter_module' disabled"):
        architectures._load_all()
    with pytest.raises(ValueError, match="'renamed_arch' is not supported.*disabled: ModuleNotFoundError"):
        architectures.get_adapter(SimpleNamespace(model_type="renamed_arch"))


def test_a_model_without_an_lm_head_is_refused():
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(tiny_config("llama"))
    with pytest.raises(ValueError, match="prunes LlamaForCausalLM models"):
        plan(model, {"hidden_size": 32})


def test_save_refuses_a_folder_holding_another_model(tmp_path):
    out = tmp_path / "out"
    first = tiny_model("llama")
    save_pruned(first, out)
    second = tiny_model("llama", seed=5)
    prune(second, random_scores(second), {"intermediate_size": 64})
    with pytest.raises(ValueError, match="already holds a llama model"):
        save_pruned(second, out)
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 96
    save_pruned(second, out, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 64
    save_pruned(second, out)  # the same model again: nothing to protect
    assert sorted(p for p in os.listdir(tmp_path)) == ["out"]


def test_save_refuses_unrelated_files(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds 1 entries"):
        save_pruned(tiny_model("llama"), tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_save_never_writes_over_the_source_folder(tmp_path):
    source = tmp_path / "source"
    save_pruned(tiny_model("llama"), source)
    model = AutoModelForCausalLM.from_pretrained(source)
    prune(model, random_scores(model), {"hidden_size": 32})
    for target in (source, tmp_path):
        with pytest.raises(ValueError, match="loaded from"):
            save_pruned(model, target, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(source).config.hidden_size == 64


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_save_leaves_no_half_written_output(tmp_path, monkeypatch, existing):
    out = tmp_path / "out"
    if existing:
        save_pruned(tiny_model("llama", seed=4), out)
    model = tiny_model("llama")
    original_save = type(model).save_pretrained

    def save_then_die(self, folder, **kwargs):
        original_save(self, folder, **kwargs)  # the weights are on disk, in the staging folder
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, out, overwrite=True)
    if existing:
        assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
        assert json.loads((out / "slimlm_prune.json").read_text())["fingerprint"] != model_fingerprint(model)
    else:
        assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == (["out"] if existing else [])


def test_inplace_false_leaves_the_source(input_ids):
    model = tiny_model("phi3")
    before = snapshot(model)
    pruned = prune(model, random_scores(model), CASES["all"], inplace=False)
    assert pruned is not model and pruned.config.hidden_size == 32
    assert_untouched(model, before)
