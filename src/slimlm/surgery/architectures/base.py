"""What generic surgery needs to know about one decoder-only architecture.

An adapter answers questions (where are this layer's projections and norms, is qkv
fused, how do norms and embeddings scale, which config fields change with which axis);
``slimlm.surgery`` does all slicing. The defaults describe the Llama layout; an
architecture overrides only what differs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Config fields that hold one entry per decoder layer and must follow dropped layers.
DEFAULT_PER_LAYER_FIELDS = ("layer_types",)


@dataclass(frozen=True)
class AttentionProjections:
    """A layer's attention projections. ``qkv`` is set (and q/k/v are None) when fused,
    rows ordered [all query heads | all key heads | all value heads]."""

    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    qkv: nn.Linear | None
    o: nn.Linear


@dataclass(frozen=True)
class MlpProjections:
    """A layer's gated MLP. ``gate_up`` is set (gate and up None) when fused, rows [gate | up]."""

    gate: nn.Linear | None
    up: nn.Linear | None
    gate_up: nn.Linear | None
    down: nn.Linear


class DecoderAdapter:
    """The Llama layout: ``model.model.{embed_tokens, layers, norm}``, ``model.lm_head``,
    separate q/k/v/o and gate/up/down projections, two RMSNorms per layer."""

    model_type: str = ""
    # The transformers class this adapter describes (imported by each architecture module).
    causal_lm_class: type = nn.Module
    # Paths inside one decoder layer.
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    o_proj: str = "self_attn.o_proj"
    gate_proj: str | None = "mlp.gate_proj"
    up_proj: str | None = "mlp.up_proj"
    gate_up_proj: str | None = None
    down_proj: str = "mlp.down_proj"
    # Norms over the hidden size inside a layer (their weights lose pruned hidden channels).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # RMSNorm computes x / rms(x) * (norm_offset + weight): 0 for Llama, 1 for Gemma.
    norm_offset: float = 0.0
    # Gemma multiplies token embeddings by sqrt(hidden_size), so that factor changes with hidden.
    scales_embeddings: bool = False
    # transformers' config validation of this family demands hidden_size % num_attention_heads == 0
    # (even where head_dim is explicit), so the planner only proposes such sizes.
    hidden_multiple_of_heads: bool = False
    per_layer_fields: tuple[str, ...] = DEFAULT_PER_LAYER_FIELDS

    # --- where things are -------------------------------------------------------------------
    def decoder(self, model) -> nn.Module:
        return model.model

    def layers(self, model) -> nn.ModuleList:
        return self.decoder(model).layers

    def set_layers(self, model, layers: list[nn.Module]) -> None:
        self.decoder(model).layers = nn.ModuleList(layers)

    def embedding(self, model) -> nn.Embedding:
        return self.decoder(model).embed_tokens

    def final_norm(self, model) -> nn.Module:
        return self.decoder(model).norm

    def lm_head(self, model) -> nn.Linear:
        return model.lm_head

    def attention(self, layer) -> AttentionProjections:
        get = layer.get_submodule
        if self.qkv_proj is not None:
            return AttentionProjections(None, None, None, get(self.qkv_proj), get(self.o_proj))
        return AttentionProjections(get(self.q_proj), get(self.k_proj), get(self.v_proj), None, get(self.o_proj))

    def mlp(self, layer) -> MlpProjections:
        get = layer.get_submodule
        if self.gate_up_proj is not None:
            return MlpProjections(None, None, get(self.gate_up_proj), get(self.down_proj))
        return MlpProjections(get(self.gate_proj), get(self.up_proj), None, get(self.down_proj))

    def hidden_norms(self, layer) -> list[nn.Module]:
        return [layer.get_submodule(name) for name in self.layer_norms]

    # --- how the config follows the weights ----------------------------------------------------
    def rewrite_config(self, config, sizes: dict, kept_layers: list[int]) -> None:
        """Write the new sizes into ``config`` (in place). ``sizes`` holds hidden_size,
        intermediate_size, num_attention_heads, num_key_value_heads, head_dim, num_layers;
        ``kept_layers`` are the original indices of the layers that remain, in order."""
        config.hidden_size = sizes["hidden_size"]
        config.intermediate_size = sizes["intermediate_size"]
        config.num_attention_heads = sizes["num_attention_heads"]
        config.num_key_value_heads = sizes["num_key_value_heads"]
        # Written even when hidden/heads still equals it: pruning hidden or heads breaks that
        # identity, and every family here reads an explicit head_dim first.
        config.head_dim = sizes["head_dim"]
        config.num_hidden_layers = len(kept_layers)
        for name in self.per_layer_fields:
            values = getattr(config, name, None)
            if values is not None:
                setattr(config, name, [values[i] for i in kept_layers])

    def after_resize(self, model) -> None:
        """Refresh state that modules derive from the config but keep outside parameters
        and plain attributes (called after the config was rewritten)."""


def count_kept_below(kept_layers: list[int], threshold: int) -> int:
    """How many kept layers had an original index below ``threshold`` (for fields such as
    Qwen's ``max_window_layers`` that split the stack at a layer index)."""
    return sum(1 for index in kept_layers if index < threshold)
