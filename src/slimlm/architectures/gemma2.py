"""Gemma 2: embeddings scaled by sqrt(hidden_size), RMSNorm as x̂·(1 + w), four norms per
layer (pre/post attention, pre/post feed-forward; the two "pre" ones feed the blocks),
alternating sliding/full layers in ``layer_types``; logit soft-capping (read by the LM-head
view from ``final_logit_softcapping``) needs no change because logits are preserved."""
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2ForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter


@register("gemma2")
class Gemma2Adapter(DecoderAdapter):
    causal_lm_class = Gemma2ForCausalLM
    layer_norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                   "post_feedforward_layernorm")
    block_input_norms = ("input_layernorm", "pre_feedforward_layernorm")
    norm_offset = 1.0
    scales_embeddings = True
    hidden_multiple_of_heads = True

    def after_resize(self, model):
        embedding = self.embedding(model)
        # embed_scale is a non-persistent buffer computed from hidden_size at construction;
        # a reloaded model recomputes it, so the in-memory one must match.
        with torch.no_grad():
            embedding.embed_scale.fill_(model.config.hidden_size**0.5)
        embedding.scalar_embed_scale = model.config.hidden_size**0.5
