"""Llama (Llama 2/3, SmolLM2, ...): the default layout, optional attention and MLP biases."""
from transformers.models.llama.modeling_llama import LlamaForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter


@register("llama")
class LlamaAdapter(DecoderAdapter):
    causal_lm_class = LlamaForCausalLM
    gguf_architecture = "llama"
    gguf_interleaved_rope = True
    hidden_multiple_of_heads = True
