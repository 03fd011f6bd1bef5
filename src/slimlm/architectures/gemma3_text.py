"""Gemma 3 (text, ``gemma3_text``): the Gemma 2 layout plus q_norm/k_norm over head_dim
(shared by all heads, untouched by head pruning); the sliding pattern is spelled out in
``layer_types``, which the generic code slices when layers are dropped."""
from transformers.models.gemma3.modeling_gemma3 import Gemma3ForCausalLM

from slimlm.architectures import register
from slimlm.architectures.gemma2 import Gemma2Adapter


@register("gemma3_text")
class Gemma3TextAdapter(Gemma2Adapter):
    causal_lm_class = Gemma3ForCausalLM
