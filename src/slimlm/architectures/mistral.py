"""Mistral: the Llama layout with one sliding window shared by every layer (no per-layer list);
llama.cpp runs it as its Llama architecture, without the window."""
from transformers.models.mistral.modeling_mistral import MistralForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter


@register("mistral")
class MistralAdapter(DecoderAdapter):
    causal_lm_class = MistralForCausalLM
    gguf_architecture = "llama"
    gguf_interleaved_rope = True

    def gguf_refusal(self, config):
        window = getattr(config, "sliding_window", None)
        if window is not None and window < config.max_position_embeddings:
            return (f"its sliding window ({window} tokens, shorter than its {config.max_position_embeddings}-token "
                    "context) is not run by llama.cpp's Llama architecture")
        return super().gguf_refusal(config)
