"""estimate_importance on tiny models of every supported architecture: shapes, zeroed units,
padding, and the scores of a 2-layer Llama against a forward pass written out by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tiny import ARCHITECTURES, calibration, tiny_model
from slimlm.architectures import get_adapter, model_sizes
from slimlm.importance import ImportanceScores, estimate_importance

ALL_METRICS = ("activation", "wanda", "magnitude")


def score(model, input_ids, mask, **kwargs):
    kwargs.setdefault("metrics", ALL_METRICS)
    return estimate_importance(model, {"input_ids": input_ids, "attention_mask": mask}, progress=False, **kwargs)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_shapes(model_type):
    model = tiny_model(model_type, "scoring", num_hidden_layers=3)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    input_ids, mask = calibration(pad_from={1: 5})
    scores = score(model, input_ids, mask, batch_size=2)
    expected = {
        "head": (3, 4),
        "kv_group": (3, 2),
        "neuron": (3, config.intermediate_size),
        "hidden": (config.hidden_size,),
    }
    for metric in ALL_METRICS:
        for axis, shape in expected.items():
            value = scores.get(axis, metric)
            assert value.shape == shape and value.dtype == torch.float32 and torch.isfinite(value).all()
            assert (value > 0).all(), f"{metric}.{axis}: random weights give positive scores"
        torch.testing.assert_close(scores.get("kv_group", metric), scores.get("head", metric).view(3, 2, 2).sum(-1))
    assert scores.get("layer", "block_influence").shape == (3,)
    assert scores.get("layer", "loss_drop").shape == (3,)
    assert scores.meta["num_samples"] == 5 and scores.meta["num_tokens"] == int(mask.sum())
    assert scores.meta["model_type"] == model_type and scores.meta["seq_agg"] == "mean"
    assert head_dim * 4 == model.model.layers[0].self_attn.o_proj.in_features


def _rows(model, layer, name):
    """(weight, bias) row views of q/k/v/gate/up whether or not the architecture fuses them."""
    adapter, sizes = get_adapter(model), model_sizes(model.config)
    q_size = sizes["num_attention_heads"] * sizes["head_dim"]
    kv_size = sizes["num_key_value_heads"] * sizes["head_dim"]
    if name in ("q", "k", "v"):
        attention = adapter.attention(layer)
        fused, split, index = attention.qkv, [q_size, kv_size, kv_size], "qkv".index(name)
        proj = fused if fused is not None else getattr(attention, name)
    else:
        mlp = adapter.mlp(layer)
        fused, split, index = mlp.gate_up, [sizes["intermediate_size"]] * 2, ("gate", "up").index(name)
        proj = fused if fused is not None else getattr(mlp, name)
    if fused is None:
        return proj.weight, proj.bias
    return proj.weight.split(split)[index], None if proj.bias is None else proj.bias.split(split)[index]


def _zero_gain(adapter, norm, channel):
    """Make a norm's gain (``norm_offset + weight``) 0 at ``channel``."""
    norm.weight[channel] = -adapter.norm_offset


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_zeroed_units_score_lowest(model_type):
    model = tiny_model(model_type, "scoring", num_hidden_layers=3)
    adapter = get_adapter(model)
    layers = model.model.layers
    head_dim = layers[0].self_attn.o_proj.in_features // 4
    group_heads = slice(2 * head_dim, 4 * head_dim)  # heads 2 and 3 = KV group 1
    neuron, channel = 5, 7
    with torch.no_grad():
        # Heads of KV group 1 in layer 1: their value rows, query rows and output columns.
        layer = layers[1]
        for name, rows in (("v", slice(head_dim, 2 * head_dim)), ("q", group_heads)):
            weight, bias = _rows(model, layer, name)
            weight[rows] = 0
            if bias is not None:
                bias[rows] = 0
        layer.self_attn.o_proj.weight[:, group_heads] = 0
        # Neuron 5 of layer 0.
        for name in ("gate", "up"):
            _rows(model, layers[0], name)[0][neuron] = 0
        layers[0].mlp.down_proj.weight[:, neuron] = 0
        # Hidden channel 7 everywhere: the residual stream's channel stays 0.
        model.get_input_embeddings().weight[:, channel] = 0
        model.get_output_embeddings().weight[:, channel] = 0
        _zero_gain(adapter, model.model.norm, channel)
        for layer in layers:
            for norm in adapter.hidden_norms(layer):
                _zero_gain(adapter, norm, channel)
            for name in ("q", "k", "v", "gate", "up"):
                _rows(model, layer, name)[0][:, channel] = 0
            layer.self_attn.o_proj.weight[channel] = 0
            layer.mlp.down_proj.weight[channel] = 0
        # Layer 2 adds nothing to the residual stream.
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.down_proj.weight.zero_()
    input_ids, mask = calibration(pad_from={0: 6})
    scores = score(model, input_ids, mask)
    for metric in ALL_METRICS:
        head = scores.get("head", metric)
        assert torch.all(head[1, 2:] <= 1e-6) and head[1, 2:].max() < head[head > 1e-6].min()
        kv_group = scores.get("kv_group", metric)
        assert kv_group[1, 1] <= 1e-6 and int(kv_group.argmin()) == 1 * 2 + 1
        neurons = scores.get("neuron", metric)
        assert neurons[0, neuron] <= 1e-6 and int(neurons.argmin()) == neuron
        hidden = scores.get("hidden", metric)
        assert hidden[channel] <= 1e-6 and int(hidden.argmin()) == channel
    block_influence = scores.get("layer", "block_influence")
    assert block_influence[2].abs() < 1e-5 and int(block_influence.argmin()) == 2
    assert scores.get("layer", "loss_drop")[2].abs() < 1e-5


@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_padding_never_counts(model_type):
    """Right padding: garbage in padded slots changes nothing, and the scores equal those of
    the unpadded samples run one by one."""
    model = tiny_model(model_type, "scoring")
    lengths = [11, 4, 8, 0, 11]
    input_ids, mask = calibration(pad_from={i: n for i, n in enumerate(lengths)})
    reference = score(model, input_ids, mask)
    garbage = input_ids.clone()
    garbage[mask == 0] = torch.randint(2, 61, (int((mask == 0).sum()),))
    padded_garbage = score(model, garbage, mask)
    one_by_one = estimate_importance(
        model,
        [{"input_ids": input_ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]} for i, n in enumerate(lengths) if n],
        metrics=ALL_METRICS,
        progress=False,
    )
    assert reference.meta["num_samples"] == 4
    for key, value in reference.scores.items():
        torch.testing.assert_close(padded_garbage.scores[key], value, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(one_by_one.scores[key], value, rtol=1e-4, atol=1e-5, msg=key)


# --- the slow reference: a 2-layer Llama written out by hand ------------------------------------


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def manual_llama(model, input_ids, skip=None):
    """Per-layer activations and final hidden state, from the weights alone (causal attention,
    right padding needs no pad mask for the real tokens)."""
    inner, config = model.model, model.config
    batch, seq = input_ids.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    hidden = inner.embed_tokens.weight[input_ids]
    cos, sin = inner.rotary_emb(hidden, torch.arange(seq)[None])
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    records = []
    for i, layer in enumerate(inner.layers):
        if i == skip:
            continue
        attention = layer.self_attn
        x_attn = rms_norm(hidden, layer.input_layernorm.weight, config.rms_norm_eps)
        q = (x_attn @ attention.q_proj.weight.T).view(batch, seq, heads, head_dim).transpose(1, 2)
        k = (x_attn @ attention.k_proj.weight.T).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        v = (x_attn @ attention.v_proj.weight.T).view(batch, seq, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal, dim=-1)
        o_in = (weights @ v).transpose(1, 2).reshape(batch, seq, heads * head_dim)
        after_attention = hidden + o_in @ attention.o_proj.weight.T
        x_mlp = rms_norm(after_attention, layer.post_attention_layernorm.weight, config.rms_norm_eps)
        down_in = F.silu(x_mlp @ layer.mlp.gate_proj.weight.T) * (x_mlp @ layer.mlp.up_proj.weight.T)
        out = after_attention + down_in @ layer.mlp.down_proj.weight.T
        records.append(dict(x_attn=x_attn, o_in=o_in, x_mlp=x_mlp, down_in=down_in, h_in=hidden, h_out=out))
        hidden = out
    return records, hidden


def seq_then_batch(values, mask, seq_agg, batch_agg):
    """values (B, S, U): aggregate each sample's real tokens, then the samples with any."""
    per_sample = []
    for b in range(values.shape[0]):
        real = values[b, mask[b].bool()].double()
        if real.shape[0] == 0:
            continue
        per_sample.append(
            {"mean": lambda: real.abs().mean(0), "l2": lambda: real.norm(dim=0), "var": lambda: real.var(0, correction=0)}[
                seq_agg
            ]()
        )
    stacked = torch.stack(per_sample)
    return {"mean": lambda: stacked.mean(0), "l2": lambda: stacked.norm(dim=0), "var": lambda: stacked.var(0, correction=0)}[
        batch_agg
    ]()


def mean_nll(model, hidden, input_ids, mask):
    logits = rms_norm(hidden, model.model.norm.weight, model.config.rms_norm_eps) @ model.lm_head.weight.T
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1), reduction="none")
    return nll[pairs.reshape(-1)].double().mean()


@pytest.mark.parametrize("seq_agg,batch_agg", [("mean", "l2"), ("l2", "mean"), ("var", "var")])
def test_hooks_match_a_hand_written_forward(seq_agg, batch_agg):
    model = tiny_model("llama", "scoring", num_hidden_layers=2)
    heads, head_dim = 4, 8
    input_ids, mask = calibration(batch=6, seq=9, pad_from={1: 3, 4: 7, 5: 1})
    scores = score(model, input_ids, mask, seq_agg=seq_agg, batch_agg=batch_agg, batch_size=4)
    with torch.no_grad():
        records, final = manual_llama(model, input_ids)
        hidden = 0
        for i, r in enumerate(records):
            batch, seq = input_ids.shape
            head_norms = r["o_in"].view(batch, seq, heads, head_dim).norm(dim=-1)
            expect = {
                "head": seq_then_batch(head_norms, mask, seq_agg, batch_agg),
                "neuron": seq_then_batch(r["down_in"], mask, seq_agg, batch_agg),
            }
            for axis, value in expect.items():
                torch.testing.assert_close(scores.get(axis, "activation")[i].double(), value, rtol=2e-4, atol=1e-6)
            hidden = hidden + seq_then_batch(r["x_attn"], mask, seq_agg, batch_agg) + seq_then_batch(
                r["x_mlp"], mask, seq_agg, batch_agg
            )
        torch.testing.assert_close(scores.get("hidden", "activation").double(), hidden, rtol=2e-4, atol=1e-6)

        # Wanda: |W_ij| * ||X_j|| over all real tokens, summed over the weights a unit owns.
        real = mask.bool()
        wanda_heads, wanda_neurons, wanda_hidden = [], [], 0
        for i, (r, layer) in enumerate(zip(records, model.model.layers)):
            x_attn, x_mlp, x_o, x_down = (r[k][real].double().norm(dim=0) for k in ("x_attn", "x_mlp", "o_in", "down_in"))
            q, k, v = (getattr(layer.self_attn, f"{n}_proj").weight.double().abs() for n in "qkv")
            o = layer.self_attn.o_proj.weight.double().abs()
            gate, up, down = (getattr(layer.mlp, f"{n}_proj").weight.double().abs() for n in ("gate", "up", "down"))
            wanda_heads.append(
                torch.stack(
                    [
                        (q[h * head_dim : (h + 1) * head_dim] * x_attn).sum()
                        + (o[:, h * head_dim : (h + 1) * head_dim] * x_o[h * head_dim : (h + 1) * head_dim]).sum()
                        for h in range(heads)
                    ]
                )
            )
            wanda_neurons.append((gate * x_mlp).sum(1) + (up * x_mlp).sum(1) + (down * x_down).sum(0))
            wanda_hidden = wanda_hidden + sum((w * x_attn).sum(0) for w in (q, k, v))
            wanda_hidden = wanda_hidden + sum((w * x_mlp).sum(0) for w in (gate, up))
            wanda_hidden = wanda_hidden + (o * x_o).sum(1) + (down * x_down).sum(1)
        torch.testing.assert_close(scores.get("head", "wanda").double(), torch.stack(wanda_heads), rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(scores.get("neuron", "wanda").double(), torch.stack(wanda_neurons), rtol=2e-4, atol=1e-6)
        torch.testing.assert_close(scores.get("hidden", "wanda").double(), wanda_hidden, rtol=2e-4, atol=1e-6)

        # Depth: 1 - mean cosine over real tokens; loss with the layer skipped minus the full loss.
        for i, r in enumerate(records):
            cosine = F.cosine_similarity(r["h_in"][real].double(), r["h_out"][real].double(), dim=-1)
            assert scores.get("layer", "block_influence")[i].item() == pytest.approx(1 - cosine.mean().item(), abs=1e-5)
            full = mean_nll(model, final, input_ids, mask)
            skipped = mean_nll(model, manual_llama(model, input_ids, skip=i)[1], input_ids, mask)
            assert scores.get("layer", "loss_drop")[i].item() == pytest.approx((skipped - full).item(), abs=2e-5)
            assert scores.meta["calibration_loss"] == pytest.approx(full.item(), rel=1e-5)


def test_hand_written_forward_matches_transformers():
    """Guards the slow reference itself: it must be the model's own forward."""
    model = tiny_model("llama", "scoring", num_hidden_layers=2)
    input_ids, mask = calibration(batch=3, seq=9, pad_from={1: 3})
    with torch.no_grad():
        final = manual_llama(model, input_ids)[1]
        recorded = {}
        model.model.layers[-1].register_forward_hook(lambda m, a, out: recorded.setdefault("out", out))
        model(input_ids, attention_mask=mask)
    torch.testing.assert_close(final[mask.bool()], recorded["out"][mask.bool()], rtol=1e-5, atol=1e-5)


def test_magnitude_by_hand_and_without_data():
    model = tiny_model("qwen2", "scoring", num_hidden_layers=2)
    scores = estimate_importance(model, None, metrics=("magnitude",), depth=(), progress=False)
    layer = model.model.layers[1]
    head_dim = 8
    q, o = layer.self_attn.q_proj, layer.self_attn.o_proj
    rows = slice(head_dim, 2 * head_dim)
    expected = (q.weight[rows].square().sum() + q.bias[rows].square().sum() + o.weight[:, rows].square().sum()).sqrt()
    assert scores.get("head", "magnitude")[1, 1].item() == pytest.approx(expected.item(), rel=1e-5)
    mlp = model.model.layers[0].mlp
    expected = (mlp.gate_proj.weight[3].square().sum() + mlp.up_proj.weight[3].square().sum() + mlp.down_proj.weight[:, 3].square().sum()).sqrt()
    assert scores.get("neuron", "magnitude")[0, 3].item() == pytest.approx(expected.item(), rel=1e-5)
    assert "num_samples" not in scores.meta or scores.meta["num_samples"] == 0


def test_save_load_roundtrip_and_other_model(tmp_path):
    model = tiny_model("mistral", "scoring")
    input_ids, mask = calibration()
    scores = score(model, input_ids, mask)
    scores.save(tmp_path / "scores")
    loaded = ImportanceScores.load(tmp_path / "scores", model=model)
    assert loaded.meta == scores.meta
    for key, value in scores.scores.items():
        assert torch.equal(loaded.scores[key], value)
    assert loaded.best_layers(1) == scores.best_layers(1)
    with pytest.raises(ValueError, match="not on this model"):
        ImportanceScores.load(tmp_path / "scores", model=tiny_model("mistral", "scoring", seed=1))
    with pytest.raises(ValueError, match="not on this model"):
        ImportanceScores.load(tmp_path / "scores", model=tiny_model("mistral", "scoring", intermediate_size=40))


def test_token_blocks_and_num_samples():
    from slimlm.data import TokenBlocks

    model = tiny_model("llama", "scoring")
    input_ids, mask = calibration(batch=7)
    blocks = TokenBlocks(input_ids, mask)
    from_blocks = estimate_importance(model, blocks, num_samples=5, batch_size=3, depth=(), progress=False)
    from_tensor = estimate_importance(model, input_ids[:5], depth=(), progress=False)
    assert from_blocks.meta["num_samples"] == 5
    for key, value in from_tensor.scores.items():
        torch.testing.assert_close(from_blocks.scores[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["qwen3", "mistral"])
def test_loss_drop_on_the_first_samples(model_type):
    model = tiny_model(model_type, "scoring", num_hidden_layers=3)
    input_ids, mask = calibration(batch=7, pad_from={1: 5, 3: 2})
    batches = {"input_ids": input_ids, "attention_mask": mask}
    subset = estimate_importance(model, batches, depth=("loss_drop",), metrics=(), loss_drop_samples=3, batch_size=2, progress=False)
    first = estimate_importance(model, batches, depth=("loss_drop",), metrics=(), num_samples=3, batch_size=3, progress=False)
    assert subset.meta["loss_drop_samples"] == 3 and subset.meta["num_samples"] == 7
    torch.testing.assert_close(subset.get("layer", "loss_drop"), first.get("layer", "loss_drop"), rtol=1e-4, atol=1e-6)
    assert subset.meta["calibration_loss"] == pytest.approx(first.meta["calibration_loss"], rel=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"metrics": ("taylor",)}, "unknown width metric"),
        ({"depth": ("ppl",)}, "unknown depth metric"),
        ({"seq_agg": "max"}, "seq_agg must be one of"),
        ({"batch_size": 0}, "batch_size"),
        ({"metrics": (), "depth": ()}, "nothing to score"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_importance(tiny_model("llama", "scoring"), torch.zeros(1, 4, dtype=torch.long), progress=False, **kwargs)


def test_bad_calibration():
    model = tiny_model("llama", "scoring")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 61\)"):
        estimate_importance(model, torch.full((2, 4), 61), progress=False)
    with pytest.raises(ValueError, match="above the model's limit"):
        estimate_importance(model, torch.zeros(1, 65, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="no real tokens"):
        estimate_importance(model, [{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.zeros(2, 3)}], progress=False)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="does not know model_type 'gpt2'"):
        estimate_importance(model, torch.zeros(1, 4, dtype=torch.long), progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("model_type", ["llama", "phi3"])
def test_gpu_scores_match_cpu(model_type):
    """The hooks on CUDA (CUDA kernels by default) give the CPU's scores; the model comes back to the CPU."""
    model = tiny_model(model_type, "scoring", num_hidden_layers=3)
    input_ids, mask = calibration(pad_from={1: 5, 3: 0})
    on_cpu = score(model, input_ids, mask, batch_size=2)
    on_gpu = score(model, input_ids, mask, batch_size=2, device="cuda")
    assert next(model.parameters()).device.type == "cpu"
    for key, value in on_cpu.scores.items():
        torch.testing.assert_close(on_gpu.scores[key], value, rtol=2e-4, atol=2e-5, msg=key)
