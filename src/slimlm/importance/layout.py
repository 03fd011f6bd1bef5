"""Where scoring finds things in a Hugging Face decoder: a minimal per-architecture lookup.

Scoring needs, per decoder layer, the output projections whose *inputs* it measures
(``o_proj``: heads; ``down_proj``: neurons), the two norms whose outputs feed the attention
and MLP blocks (hidden channels), and — for the weight-based metrics — the rows of the
query/key/value and gate/up weights. Phi-3 fuses q/k/v (rows [queries | keys | values])
and gate/up (rows [gate | up]); the inputs of ``o_proj`` and ``down_proj`` are the same
as in the unfused layout, so only the weight views differ.

This lookup is self-contained on purpose: ``slimlm.surgery.architectures`` holds the full
adapters used for pruning, and this module can be replaced by them without changing the
scorers (they only use ``ModelLayout``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type → (fused qkv path or None, fused gate_up path or None), inside a decoder layer.
ARCHITECTURES: dict[str, tuple[str | None, str | None]] = {
    "llama": (None, None),
    "mistral": (None, None),
    "qwen2": (None, None),
    "qwen3": (None, None),
    "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj"),
}


@dataclass(frozen=True)
class LayerModules:
    """One decoder layer. Weight fields are views (rows of fused weights where fused)."""

    layer: nn.Module
    attention_norm: nn.Module
    mlp_norm: nn.Module
    o_proj: nn.Linear
    down_proj: nn.Linear
    q_weight: torch.Tensor  # (heads·head_dim, hidden)
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor  # (kv_heads·head_dim, hidden)
    v_weight: torch.Tensor
    gate_weight: torch.Tensor  # (intermediate, hidden)
    up_weight: torch.Tensor


@dataclass(frozen=True)
class ModelLayout:
    layers: list[LayerModules]
    decoder_layers: nn.ModuleList
    embedding: nn.Embedding
    final_norm: nn.Module
    lm_head: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight.data_ptr() == self.embedding.weight.data_ptr()


def _get(module: nn.Module, path: str, model_type: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{model_type} layer has no {path}; this layout is not supported by importance scoring") from None


def model_layout(model) -> ModelLayout:
    """The layout of ``model`` (a ``*ForCausalLM``); ValueError for an architecture not in ``ARCHITECTURES``."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"importance scoring does not know model_type {model_type!r}; supported: {', '.join(ARCHITECTURES)}"
        )
    fused_qkv, fused_gate_up = ARCHITECTURES[model_type]
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    intermediate = config.intermediate_size
    q_rows, kv_rows = num_heads * head_dim, num_kv_heads * head_dim
    layers = []
    for layer in model.model.layers:
        if fused_qkv:
            qkv = _get(layer, fused_qkv, model_type)
            q_weight, k_weight, v_weight = qkv.weight.split([q_rows, kv_rows, kv_rows])
            q_bias = qkv.bias[:q_rows] if qkv.bias is not None else None
        else:
            q_proj = _get(layer, "self_attn.q_proj", model_type)
            q_weight, q_bias = q_proj.weight, q_proj.bias
            k_weight = _get(layer, "self_attn.k_proj", model_type).weight
            v_weight = _get(layer, "self_attn.v_proj", model_type).weight
        if fused_gate_up:
            gate_weight, up_weight = _get(layer, fused_gate_up, model_type).weight.split([intermediate, intermediate])
        else:
            gate_weight = _get(layer, "mlp.gate_proj", model_type).weight
            up_weight = _get(layer, "mlp.up_proj", model_type).weight
        layers.append(
            LayerModules(
                layer=layer,
                attention_norm=_get(layer, "input_layernorm", model_type),
                mlp_norm=_get(layer, "post_attention_layernorm", model_type),
                o_proj=_get(layer, "self_attn.o_proj", model_type),
                down_proj=_get(layer, "mlp.down_proj", model_type),
                q_weight=q_weight,
                q_bias=q_bias,
                k_weight=k_weight,
                v_weight=v_weight,
                gate_weight=gate_weight,
                up_weight=up_weight,
            )
        )
    return ModelLayout(
        layers=layers,
        decoder_layers=model.model.layers,
        embedding=model.get_input_embeddings(),
        final_norm=model.model.norm,
        lm_head=model.get_output_embeddings(),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        intermediate_size=intermediate,
    )
