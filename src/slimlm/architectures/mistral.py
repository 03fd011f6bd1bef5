"""Mistral: the Llama layout with one sliding window shared by every layer (no per-layer list)."""
from transformers.models.mistral.modeling_mistral import MistralForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter


@register("mistral")
class MistralAdapter(DecoderAdapter):
    causal_lm_class = MistralForCausalLM
