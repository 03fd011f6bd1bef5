"""Qwen2: biases on q/k/v (sliced with their rows); sliding attention on the layers from
``max_window_layers`` on, spelled out per layer in ``layer_types``."""
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM

from slimlm.architectures import register
from slimlm.architectures.base import DecoderAdapter, count_kept_below


@register("qwen2")
class Qwen2Adapter(DecoderAdapter):
    causal_lm_class = Qwen2ForCausalLM
    gguf_architecture = "qwen2"

    def rewrite_config(self, config, sizes, kept_layers):
        super().rewrite_config(config, sizes, kept_layers)
        # layer_types (already sliced) decides the attention; max_window_layers is kept
        # consistent with it so a config rebuilt from it alone gives the same layer types.
        config.max_window_layers = count_kept_below(kept_layers, config.max_window_layers)
