"""Weight metrics: ``magnitude`` (data-free) and ``wanda`` (weights × input norms).

``magnitude`` = L2 norm of the weights a unit owns; ``wanda`` = Σ over those weights of
|W_ij|·‖X_j‖₂, with ‖X_j‖₂ over all real calibration tokens of the weight's input channel j
(the hooks' ``*.squares`` sums). A head owns its q rows (and q bias) and o columns, a neuron
its gate and up rows and down column, a hidden channel its column of every q/k/v/gate/up
weight and its row of every o/down weight, plus, for magnitude, its gain in every norm over
the hidden size (``norm_offset + weight``, as the family's adapter defines it) and its
embedding and (untied) LM-head column. Fused q/k/v and gate/up are read as row views.
"""
from __future__ import annotations

import torch

from slimlm.architectures import DecoderAdapter


def weight_scores(model, adapter: DecoderAdapter, sizes: dict, metric: str,
                  sums: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``magnitude`` or ``wanda`` scores for head, neuron and hidden (fp32, on the CPU).

    Computed in fp32 on the weights' device, one matrix at a time (one |W| or W² temporary).
    """
    num_heads, head_dim = sizes["num_attention_heads"], sizes["head_dim"]
    q_size, kv_size = num_heads * head_dim, sizes["num_key_value_heads"] * head_dim
    embedding, final_norm = adapter.embedding(model), adapter.final_norm(model)
    device = embedding.weight.device
    heads, neurons = [], []
    hidden = torch.zeros(sizes["hidden_size"], dtype=torch.float32, device=device)
    f = lambda t: t.detach().float()  # noqa: E731
    if metric == "magnitude":
        reduce = lambda t: f(t).square()  # noqa: E731
    else:
        reduce = lambda t: f(t).abs()  # noqa: E731
    for i, layer in enumerate(adapter.layers(model)):
        attention, mlp = adapter.attention(layer), adapter.mlp(layer)
        q, k, v = (reduce(w) for w in attention.weights(q_size, kv_size))
        gate, up = (reduce(w) for w in mlp.weights(sizes["intermediate_size"]))
        o, down = reduce(attention.o.weight), reduce(mlp.down.weight)
        if metric == "magnitude":
            q_bias = attention.q_bias(q_size)
            q_rows = q.sum(1) + (f(q_bias).square() if q_bias is not None else 0)
            heads.append((q_rows + o.sum(0)).view(num_heads, head_dim).sum(1).sqrt())
            neurons.append((gate.sum(1) + up.sum(1) + down.sum(0)).sqrt())
            hidden += q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0) + o.sum(1) + down.sum(1)
            for norm in adapter.hidden_norms(layer):
                gain = adapter.norm_gain(norm)
                if gain is not None:
                    hidden += f(gain).square()
        else:
            x_attn = sums[f"attn_norm.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_mlp = sums[f"mlp_norm.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_o = sums[f"o_in.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            x_down = sums[f"neuron.{i}.squares"].to(device=device, dtype=torch.float32).sqrt()
            head = q @ x_attn + o.sum(0) * x_o
            heads.append(head.view(num_heads, head_dim).sum(1))
            neurons.append(gate @ x_mlp + up @ x_mlp + down.sum(0) * x_down)
            hidden += x_attn * (q.sum(0) + k.sum(0) + v.sum(0)) + x_mlp * (gate.sum(0) + up.sum(0))
            hidden += o @ x_o + down @ x_down
    if metric == "magnitude":
        hidden += f(embedding.weight).square().sum(0)
        if not adapter.tied(model):
            hidden += f(adapter.lm_head(model).weight).square().sum(0)
        gain = adapter.norm_gain(final_norm)
        if gain is not None:
            hidden += f(gain).square()
        hidden = hidden.sqrt()
    return {"head": torch.stack(heads).cpu(), "neuron": torch.stack(neurons).cpu(), "hidden": hidden.cpu()}
