"""Architecture adapters, registered by ``config.model_type``.

To support a new family, add ``architectures/<model_type>.py`` defining a
``DecoderAdapter`` subclass decorated with ``@register("<model_type>")`` and list the
module in ``_MODULES`` below. Each module is imported in a guard: if a transformers
release renames something an adapter imports, that adapter is disabled (and says why
when asked for) instead of breaking ``import slimlm``.
"""
from __future__ import annotations

import importlib
import warnings

from slimlm.surgery.architectures.base import AttentionProjections, DecoderAdapter, MlpProjections

_REGISTRY: dict[str, DecoderAdapter] = {}
_DISABLED: dict[str, str] = {}
# module name -> the model_types it registers (reported as disabled when its import fails)
_MODULES = {
    "llama": ("llama",),
    "mistral": ("mistral",),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "phi3": ("phi3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3_text",),
}


def register(*model_types: str):
    """Class decorator: register one adapter instance under each ``model_type``."""

    def decorate(cls):
        for model_type in model_types:
            adapter = cls()
            adapter.model_type = model_type
            _REGISTRY[model_type] = adapter
        return cls

    return decorate


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_or_config) -> DecoderAdapter:
    """The adapter for a model (or config); ValueError naming the supported types otherwise,
    or when a model of a supported type is not its causal-LM class (e.g. a classifier head)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        adapter = _REGISTRY[model_type]
        if model_or_config is not config and not isinstance(model_or_config, adapter.causal_lm_class):
            raise ValueError(
                f"slimlm.surgery prunes {adapter.causal_lm_class.__name__} models for model_type "
                f"{model_type!r}, got {type(model_or_config).__name__}"
            )
        return adapter
    disabled = f" (its adapter is disabled: {_DISABLED[model_type]})" if model_type in _DISABLED else ""
    raise ValueError(
        f"model_type {model_type!r} is not supported by slimlm.surgery{disabled}; supported: "
        f"{', '.join(supported_model_types())}. To add one, write src/slimlm/surgery/architectures/"
        f"{model_type}.py with a DecoderAdapter subclass registered by @register({model_type!r}) and list "
        "it in _MODULES of slimlm/surgery/architectures/__init__.py"
    )


def _load_all() -> None:
    for name, model_types in _MODULES.items():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except (ImportError, AttributeError) as error:
            for model_type in model_types:
                _DISABLED[model_type] = f"{type(error).__name__}: {error}"
            warnings.warn(f"slimlm.surgery: adapter {name!r} disabled ({error})", stacklevel=2)


_load_all()

__all__ = ["AttentionProjections", "DecoderAdapter", "MlpProjections", "get_adapter", "register",
           "supported_model_types"]
