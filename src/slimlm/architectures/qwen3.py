"""Qwen3: the Qwen2 stack without qkv bias, plus RMSNorms over head_dim on queries and keys
(``q_norm``/``k_norm``, shared by all heads, so head pruning leaves them as they are)."""
from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

from slimlm.architectures import register
from slimlm.architectures.qwen2 import Qwen2Adapter


@register("qwen3")
class Qwen3Adapter(Qwen2Adapter):
    causal_lm_class = Qwen3ForCausalLM
    gguf_architecture = "qwen3"
