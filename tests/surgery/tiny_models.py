"""Tiny random-weight models, one per registered architecture, built from configs (nothing
downloaded). Sizes are chosen so every axis can shrink: 4 query heads in 2 KV groups,
sliding windows shorter than the test sequences, layer types that differ per layer."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from slimlm.importance.scores import ImportanceScores, model_fingerprint
from slimlm.surgery import supported_model_types

COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              num_hidden_layers=4, vocab_size=128, max_position_embeddings=64, initializer_range=0.1,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True, **COMMON),  # SmolLM2-like
    "mistral": dict(model_type="mistral", sliding_window=5, **COMMON),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2, **COMMON),
    "qwen3": dict(model_type="qwen3", use_sliding_window=True, sliding_window=5, max_window_layers=2,
                  tie_word_embeddings=True, **COMMON),
    "phi3": dict(model_type="phi3", sliding_window=5, **COMMON),
    "gemma2": dict(model_type="gemma2", sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, **COMMON),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=5, query_pre_attn_scalar=16,
                        sliding_window_pattern=2, final_logit_softcapping=30.0, **COMMON),
}

ARCHITECTURES = supported_model_types()


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A tiny model of ``model_type`` in eval mode, eager attention, norms randomised too
    (so a norm sliced at the wrong channels shows in the outputs)."""
    from transformers import AutoConfig

    settings = {**TINY_CONFIGS[model_type], **overrides}
    config = AutoConfig.for_model(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model


def random_scores(model, seed: int = 1) -> ImportanceScores:
    """Random scores on every axis, fingerprinted for ``model``."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers

    def draw(*shape):
        return torch.rand(*shape, generator=generator)

    return ImportanceScores(
        scores={
            "magnitude.head": draw(layers, config.num_attention_heads),
            "magnitude.kv_group": draw(layers, config.num_key_value_heads),
            "magnitude.neuron": draw(layers, config.intermediate_size),
            "magnitude.hidden": draw(config.hidden_size),
            "block_influence.layer": draw(layers),
        },
        meta={"fingerprint": model_fingerprint(model), "model_name": f"tiny-{config.model_type}"},
    )


def snapshot(model) -> tuple[dict, dict]:
    """Copies of the weights and config, to prove a failed call left the model untouched."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict())


def assert_untouched(model, before) -> None:
    weights, config = before
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(now[key], value), key
    assert model.config.to_dict() == config
