"""Architecture adapters, registered by ``config.model_type``: the one place that knows a
model family's layout. Importance scoring, surgery, the planner's parameter counts and the
losses' LM-head view all ask ``get_adapter`` (or ``lm_head``) here.

To support a new family, add ``architectures/<model_type>.py`` defining a
``DecoderAdapter`` subclass decorated with ``@register("<model_type>")`` and list the
module in ``_MODULES`` below. Each module is imported in a guard: if a transformers
release renames something an adapter imports, that adapter is disabled (and says why
when asked for) instead of breaking ``import slimlm``.
"""
from __future__ import annotations

import importlib
import warnings

from slimlm.architectures.base import (
    PARTS,
    AttentionProjections,
    DecoderAdapter,
    LMHead,
    MlpProjections,
    model_sizes,
)
from slimlm.errors import InputError

_REGISTRY: dict[str, DecoderAdapter] = {}
_DISABLED: dict[str, str] = {}
_GENERIC = DecoderAdapter()
# module name -> the model_types it registers (reported as disabled when its import fails)
_MODULES = {
    "llama": ("llama",),
    "mistral": ("mistral",),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "phi3": ("phi3",),
    "gemma2": ("gemma2",),
    "gemma3_text": ("gemma3_text",),
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


def get_adapter(model_or_config, user: str = "slimlm", action: str = "handles") -> DecoderAdapter:
    """The adapter for a model (or config); ValueError naming the supported types otherwise,
    or when a model of a supported type is not its causal-LM class (e.g. a classifier head).
    ``user`` and ``action`` name the caller in the messages ("slimlm.surgery", "prunes")."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        adapter = _REGISTRY[model_type]
        if model_or_config is not config and not isinstance(model_or_config, adapter.causal_lm_class):
            raise ValueError(
                f"{user} {action} {adapter.causal_lm_class.__name__} models for model_type "
                f"{model_type!r}, got {type(model_or_config).__name__}"
            )
        return adapter
    disabled = f" (its adapter is disabled: {_DISABLED[model_type]})" if model_type in _DISABLED else ""
    raise InputError(
        f"{user} does not know model_type {model_type!r}: {model_type!r} is not supported{disabled}; supported: "
        f"{', '.join(supported_model_types())}. To add one, write src/slimlm/architectures/"
        f"{model_type}.py with a DecoderAdapter subclass registered by @register({model_type!r}) and list "
        "it in _MODULES of slimlm/architectures/__init__.py"
    )


def lm_head(model) -> LMHead:
    """The ``LMHead`` of any Hugging Face causal LM: its family's adapter answers; a family
    without one (Cohere, Granite, ...) gets the generic reading of the output embedding and config."""
    model_type = getattr(model.config, "model_type", None)
    return _REGISTRY.get(model_type, _GENERIC).head(model)


def _load_all() -> None:
    for name, model_types in _MODULES.items():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except (ImportError, AttributeError) as error:
            for model_type in model_types:
                _DISABLED[model_type] = f"{type(error).__name__}: {error}"
            warnings.warn(f"slimlm.architectures: adapter {name!r} disabled ({error})", stacklevel=2)


_load_all()

__all__ = ["PARTS", "AttentionProjections", "DecoderAdapter", "LMHead", "MlpProjections", "get_adapter", "lm_head",
           "model_sizes", "register", "supported_model_types"]
