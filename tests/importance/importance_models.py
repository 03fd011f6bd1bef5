"""Tiny random-weight decoders built from configs (nothing downloaded), one per architecture
importance scoring supports. All use GQA: 4 query heads in 2 KV groups."""
from __future__ import annotations

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 12}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {}),
}
VOCAB = 61


def tiny_model(model_type: str, num_layers: int = 2, seed: int = 0, **overrides):
    config_class, model_class, extra = ARCHITECTURES[model_type]
    config = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    config.update(extra)
    config.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**config)).eval()
    # Random init gives near-identical norm weights (all ones) and tiny biases; spread them so
    # that every weight family takes part in the scores.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.copy_(1.0 + 0.5 * torch.randn_like(parameter) if "norm" in name else 0.1 * torch.randn_like(parameter))
    return model


def calibration(batch: int = 5, seq: int = 11, seed: int = 1, pad_from: dict[int, int] | None = None):
    """Random token ids with right padding: sample b is real up to ``pad_from[b]``."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, start in (pad_from or {}).items():
        mask[row, start:] = 0
        input_ids[row, start:] = 0
    return input_ids, mask
