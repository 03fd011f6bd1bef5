"""Phi-3: fused ``qkv_proj`` (rows: queries, keys, values) and fused ``gate_up_proj``
(rows: gate, then up)."""
from transformers.models.phi3.modeling_phi3 import Phi3ForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter


@register("phi3")
class Phi3Adapter(DecoderAdapter):
    causal_lm_class = Phi3ForCausalLM
    q_proj = k_proj = v_proj = None
    qkv_proj = "self_attn.qkv_proj"
    gate_proj = up_proj = None
    gate_up_proj = "mlp.gate_up_proj"
