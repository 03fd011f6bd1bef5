"""What the pipeline needs to know about one decoder-only architecture.

An adapter answers questions — where this layer's projections and norms are (rows of fused
q/k/v and gate/up included), which norms feed the blocks, how norms and embeddings scale,
what the LM head is, which parts a parameter belongs to, which config fields change with
which axis, what the family's config validation demands — and the generic code in
``slimlm.importance``, ``slimlm.surgery``, ``slimlm.losses`` and the planner does the work.
The defaults describe the Llama layout; an architecture overrides only what differs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Config fields that hold one entry per decoder layer and must follow dropped layers.
DEFAULT_PER_LAYER_FIELDS = ("layer_types",)
# The parts ``parameter_parts`` sorts parameters into (a tied LM head counts under embeddings).
PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head")


def model_sizes(config) -> dict:
    """The prunable sizes of a config (plus head_dim, which pruning keeps)."""
    heads = config.num_attention_heads
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
        "num_layers": config.num_hidden_layers,
    }


@dataclass(frozen=True)
class LMHead:
    """How a causal LM turns its last hidden state into logits:
    logits = softcap((hidden @ weightᵀ + bias) · logit_scale), softcap(z) = cap · tanh(z / cap)
    (None: no cap). ``weight`` (V, H) is the input embedding itself when embeddings are tied."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def detached(self) -> "LMHead":
        """The same head over detached tensors (a frozen teacher's view)."""
        return LMHead(self.weight.detach(), None if self.bias is None else self.bias.detach(),
                      self.logit_scale, self.softcap)

    def first_rows(self, rows: int, device=None) -> "LMHead":
        """The head over its first ``rows`` vocabulary rows (moved to ``device`` when given)."""
        move = (lambda t: t) if device is None else (lambda t: t.to(device))  # noqa: E731
        bias = None if self.bias is None else move(self.bias[:rows])
        return LMHead(move(self.weight[:rows]), bias, self.logit_scale, self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of ``hidden`` (..., H)."""
        return self.scale_and_cap(nn.functional.linear(hidden, self.weight, self.bias).float())

    def scale_and_cap(self, z: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """softcap(z · logit_scale) of z = hidden @ weightᵀ + bias; ``in_place`` overwrites z
        (no autograd through it: the chunked losses, which make their own gradient)."""
        if self.logit_scale != 1.0:
            z = z.mul_(self.logit_scale) if in_place else z * self.logit_scale
        if self.softcap is not None:
            cap = self.softcap
            z = z.div_(cap).tanh_().mul_(cap) if in_place else torch.tanh(z / cap) * cap
        return z

    def chain_(self, grad: torch.Tensor, logits: torch.Tensor) -> None:
        """d loss / dz in place from ``grad`` = d loss / d logits, given the logits themselves:
        d softcap(s)/ds = 1 − (logit / cap)², then the scale's constant factor."""
        if self.softcap is not None:
            grad.mul_(torch.square(logits.div(self.softcap)).neg_().add_(1.0))
        if self.logit_scale != 1.0:
            grad.mul_(self.logit_scale)


@dataclass(frozen=True)
class AttentionProjections:
    """A layer's attention projections. ``qkv`` is set (and q/k/v are None) when fused,
    rows ordered [all query heads | all key heads | all value heads]."""

    q: nn.Linear | None
    k: nn.Linear | None
    v: nn.Linear | None
    qkv: nn.Linear | None
    o: nn.Linear

    def weights(self, q_size: int, kv_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (q, k, v) weights, (q_size | kv_size | kv_size, hidden): row views when fused."""
        if self.qkv is not None:
            return tuple(self.qkv.weight.split([q_size, kv_size, kv_size]))
        return self.q.weight, self.k.weight, self.v.weight

    def q_bias(self, q_size: int) -> torch.Tensor | None:
        projection = self.qkv if self.qkv is not None else self.q
        return None if projection.bias is None else projection.bias[:q_size]

    @staticmethod
    def fused_rows(q_rows: torch.Tensor, kv_rows: torch.Tensor, q_size: int, kv_size: int) -> torch.Tensor:
        """Rows of a fused qkv weight holding query rows ``q_rows`` and key/value rows ``kv_rows``."""
        return torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows])


@dataclass(frozen=True)
class MlpProjections:
    """A layer's gated MLP. ``gate_up`` is set (gate and up None) when fused, rows [gate | up]."""

    gate: nn.Linear | None
    up: nn.Linear | None
    gate_up: nn.Linear | None
    down: nn.Linear

    def weights(self, intermediate_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate, up) weights, (intermediate, hidden) each: row views when fused."""
        if self.gate_up is not None:
            return tuple(self.gate_up.weight.split([intermediate_size, intermediate_size]))
        return self.gate.weight, self.up.weight

    @staticmethod
    def fused_rows(neurons: torch.Tensor, intermediate_size: int) -> torch.Tensor:
        """Rows of a fused gate_up weight holding neurons ``neurons``."""
        return torch.cat([neurons, intermediate_size + neurons])


class DecoderAdapter:
    """The Llama layout: ``model.model.{embed_tokens, layers, norm}``, ``model.lm_head``,
    separate q/k/v/o and gate/up/down projections, two RMSNorms per layer."""

    model_type: str = ""
    # The transformers class this adapter describes (imported by each architecture module).
    causal_lm_class: type = nn.Module
    # Paths inside one decoder layer.
    attention_block: str = "self_attn"
    mlp_block: str = "mlp"
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
    # The two of them whose outputs are the inputs of the attention and of the MLP block.
    block_input_norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    # RMSNorm computes x / rms(x) * (norm_offset + weight): 0 for Llama, 1 for Gemma.
    norm_offset: float = 0.0
    # Gemma multiplies token embeddings by sqrt(hidden_size), so that factor changes with hidden.
    scales_embeddings: bool = False
    # transformers' config validation of this family demands hidden_size % num_attention_heads == 0
    # (even where head_dim is explicit), so the planner only proposes such sizes.
    hidden_multiple_of_heads: bool = False
    per_layer_fields: tuple[str, ...] = DEFAULT_PER_LAYER_FIELDS
    # llama.cpp's name for this family's architecture (None: no GGUF export); the tensor names
    # then come from the gguf package's own map for that architecture.
    gguf_architecture: str | None = None
    # llama.cpp's LLAMA rope rotates adjacent pairs of a head's dimensions where transformers
    # rotates its two halves, so such families store q/k rows interleaved per head; families on
    # llama.cpp's NEOX rope (Qwen) store them as they are.
    gguf_interleaved_rope: bool = False

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

    def tied(self, model) -> bool:
        """Whether the LM head shares the input embedding's weight."""
        return self.lm_head(model).weight is self.embedding(model).weight

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

    def block_inputs(self, layer) -> tuple[nn.Module, nn.Module]:
        """The norms whose outputs enter the attention and the MLP block, in that order."""
        attention_norm, mlp_norm = self.block_input_norms
        return layer.get_submodule(attention_norm), layer.get_submodule(mlp_norm)

    def norm_gain(self, norm: nn.Module) -> torch.Tensor | None:
        """The per-channel gain a norm applies (``norm_offset + weight``), or None without a weight."""
        weight = getattr(norm, "weight", None)
        if weight is None:
            return None
        return weight + self.norm_offset if self.norm_offset else weight

    def parameter_parts(self, model) -> dict[int, str]:
        """``id(parameter) → part`` (one of ``PARTS``) for every parameter the layout names;
        the rest (norms) are left out. A tied LM head is the embedding's weight: embeddings."""
        parts: dict[int, str] = {}
        for parameter in self.lm_head(model).parameters():
            parts[id(parameter)] = "lm_head"
        for parameter in self.embedding(model).parameters():
            parts[id(parameter)] = "embeddings"
        for layer in self.layers(model):
            for block, part in ((self.attention_block, "attention"), (self.mlp_block, "mlp")):
                for parameter in layer.get_submodule(block).parameters():
                    parts[id(parameter)] = part
        return parts

    # --- the LM head as the losses see it ------------------------------------------------------
    def head(self, model) -> LMHead:
        """The model's ``LMHead``: weight and bias of its output embedding, with the logit
        scale (Cohere's ``logit_scale`` multiplies, Granite's ``logits_scaling`` divides) and
        soft-cap (Gemma's ``final_logit_softcapping``, after scaling) from its text config."""
        head = model.get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to distill through")
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)
        return LMHead(head.weight, getattr(head, "bias", None), scale, float(softcap) if softcap else None)

    # --- how the config follows the weights ----------------------------------------------------
    def embedding_scale(self, hidden_before: int, hidden_after: int) -> float:
        """The factor the kept embedding channels are multiplied by when hidden shrinks."""
        return math.sqrt(hidden_before / hidden_after) if self.scales_embeddings else 1.0

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

    def gguf_refusal(self, config) -> str | None:
        """Why llama.cpp's ``gguf_architecture`` cannot run this config as transformers does
        (None when it can): no architecture, sliding-window layers, scaled rope."""
        if self.gguf_architecture is None:
            return "slimlm has no llama.cpp (GGUF) layout for this family"
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return "it has sliding-window attention layers, which the llama.cpp architecture does not run"
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return f"its rope scaling {rope_type!r} is not exported"
        return None

    def after_resize(self, model) -> None:
        """Refresh state that modules derive from the config but keep outside parameters
        and plain attributes (called after the config was rewritten)."""


def count_kept_below(kept_layers: list[int], threshold: int) -> int:
    """How many kept layers had an original index below ``threshold`` (for fields such as
    Qwen's ``max_window_layers`` that split the stack at a layer index)."""
    return sum(1 for index in kept_layers if index < threshold)
