"""``export_gguf``: a causal LM as one GGUF file, the format llama.cpp and the tools built on it
(Ollama, LM Studio, llama-cpp-python) run.

    export_gguf("student/", "student.gguf", outtype="q8_0")

The file holds the architecture's hyperparameters, the tokenizer (vocabulary, merges, token
types, special token ids, chat template) and the weights under llama.cpp's tensor names. What
differs between families — llama.cpp's architecture name, whether q/k rows are interleaved for
its rope, what it cannot run — is asked of the family's adapter (``slimlm.architectures``); the
tensor names come from the ``gguf`` package's own map for that architecture. The file is
written beside its place and renamed in, so a failed export leaves nothing half-written.
"""
from __future__ import annotations

import errno
import json
import os
import re

import numpy as np

from slimlm import outputs
from slimlm.architectures import get_adapter
from slimlm.errors import InputError

# outtype -> (the GGML type of matrices, general.file_type). Vectors (norms, biases) stay F32.
# These are GGML's type names, as llama.cpp's own ``convert_hf_to_gguf.py --outtype`` takes them
# (q8_0 is no dtype at all), not slimlm's precision vocabulary (``slimlm.models.DTYPE_NAMES``).
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Q8_0 quantizes blocks of this many values along a row; rows of other lengths are written F16.
_Q8_0_BLOCK = 32

# How llama.cpp names the pre-tokenizers of byte-level BPE vocabularies (``tokenizer.ggml.pre``),
# recognised by the Hugging Face pre-tokenizer that splits text the same way.
_SPLIT_REGEXES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def export_gguf(model_dir_or_model, out_path: str | os.PathLike, *, outtype: str = "f32", tokenizer=None,
                overwrite: bool = False) -> str:
    """Write a causal LM (a model folder, or a model in memory with ``tokenizer``) to the GGUF
    file ``out_path``, its matrices in ``outtype`` ("f32" | "f16" | "bf16" | "q8_0"; vectors stay
    f32, q8_0 rows whose length is not a multiple of 32 are f16); returns the path.

    Loading it with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` gives the
    source's logits within ``outtype``'s rounding. Refuses (InputError, naming the input): an
    unknown ``outtype``; an existing ``out_path`` without ``overwrite``, or one slimlm did not write
    (``slimlm.outputs.owned``: a GGUF file of another tool included), or one that is or sits inside the model folder; a family llama.cpp has no layout for or a config it cannot run
    (sliding windows, scaled rope); a model folder without a tokenizer, or a tokenizer that is not
    a byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen) with a pre-tokenizer llama.cpp names.
    A disk that fills up while writing is an OSError naming ``out_path`` (nothing is left half-written).
    """
    import gguf

    from slimlm.models import load_model, load_tokenizer

    out_path = outputs.resolve(out_path)
    if outtype not in OUTTYPES:
        raise InputError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    if isinstance(model_dir_or_model, (str, os.PathLike)):
        source = os.fspath(model_dir_or_model)
        if os.path.isdir(source) and outputs.overlaps(out_path, source):
            raise InputError(f"GGUF output {out_path} is or sits inside the model folder {source}; choose another path")
    else:
        source = getattr(model_dir_or_model, "name_or_path", None) or type(model_dir_or_model).__name__
    if os.path.isdir(out_path):
        raise InputError(f"GGUF output {out_path} is a folder; give a file path (e.g. {out_path}.gguf)")
    if os.path.exists(out_path) and not overwrite:
        raise InputError(f"GGUF output {out_path} already exists; pass --overwrite (overwrite=True in Python) to "
                         "replace it")
    if os.path.exists(out_path) and not outputs.owned(out_path):
        raise InputError(f"GGUF output {out_path} exists and was not written by slimlm; refusing to replace it even "
                         "with --overwrite / overwrite=True (choose another path or remove it yourself)")

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        if tokenizer is None and os.path.isdir(source) and not _has_tokenizer(source):
            raise InputError(f"model {source} has no tokenizer (tokenizer.json); a GGUF file carries its tokenizer, "
                             "so save one beside the weights or pass tokenizer=")
        model = load_model(source)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    else:
        model = model_dir_or_model
        if tokenizer is None:
            raise InputError(f"exporting the in-memory model {source} needs tokenizer=: a GGUF file carries its tokenizer")
    config = model.config
    adapter = get_adapter(model, "slimlm.export_gguf", "exports")
    refusal = adapter.gguf_refusal(config)
    if refusal:
        raise InputError(f"cannot export {source} ({config.model_type}) to GGUF: {refusal}")
    vocabulary = gguf_vocabulary(tokenizer, config.vocab_size, source)

    try:
        with outputs.atomic_output(out_path, folder=False, mark=True) as staging:
            writer = gguf.GGUFWriter(staging, adapter.gguf_architecture)
            _write_hyperparameters(writer, config, outtype, name=os.path.basename(source.rstrip(os.sep)) or source)
            _write_vocabulary(writer, vocabulary)
            for name, data, raw_type in _gguf_tensors(model, adapter, outtype):
                writer.add_tensor(name, data, raw_dtype=raw_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
    except OSError as error:
        full = _disk_full(error, out_path)
        if full is None:
            raise
        raise full from error
    return out_path


# numpy's ``tofile`` reports a short write (a full disk, mostly) without an errno.
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def _disk_full(error: OSError, path: str) -> OSError | None:
    """A one-line OSError naming ``path`` when ``error`` says the disk filled up (ENOSPC, EDQUOT
    or a short write), else None. A runtime failure, not bad input: the same export succeeds
    with room on the disk."""
    short = _SHORT_WRITE.search(str(error))
    if short:
        full = OSError(f"writing {path}: no space left on device ({int(short[2]):,} of {int(short[1]):,} bytes "
                       "written)")
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        full = OSError(f"writing {path}: {os.strerror(error.errno).lower()}")
    else:
        return None
    full.errno = error.errno or errno.ENOSPC
    return full


def _has_tokenizer(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer.model"))


# ------------------------------------------------------------------ hyperparameters
def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _write_hyperparameters(writer, config, outtype: str, *, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_types[outtype])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# ------------------------------------------------------------------ tensors
def interleave_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """q/k rows (or biases) from transformers' rope layout to llama.cpp's LLAMA rope layout.

    Per head of d rows, transformers rotates row i with row i + d/2; llama.cpp rotates rows 2i and
    2i + 1. So llama.cpp's row 2i is transformers' row i and its row 2i + 1 is row i + d/2:
    (heads, 2, d/2, ...) → (heads, d/2, 2, ...). transformers' GGUF loader undoes exactly this."""
    shape = weight.shape
    half = shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _gguf_tensors(model, adapter, outtype: str):
    """(llama.cpp name, array, GGML type) for every parameter; a tied LM head is left out (llama.cpp
    then uses the token embedding, and transformers' loader ties them again)."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    architecture = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == adapter.gguf_architecture)
    names = gguf.get_tensor_name_map(architecture, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    interleaved = {gguf.MODEL_TENSOR.ATTN_Q: heads, gguf.MODEL_TENSOR.ATTN_K: kv_heads}
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    # named_parameters lists a tied weight once, under its first name: the input embedding.
    for hf_name, parameter in model.named_parameters():
        found = names.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise InputError(f"{config.model_type} parameter {hf_name} has no llama.cpp tensor name "
                             f"in {adapter.gguf_architecture!r}")
        kind, name = found
        data = parameter.detach().float().cpu().numpy()
        if adapter.gguf_interleaved_rope and kind in interleaved:
            data = interleave_rope_rows(data, interleaved[kind])
        raw_type = matrix_type if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        if raw_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % _Q8_0_BLOCK:
            raw_type = gguf.GGMLQuantizationType.F16
        if raw_type == gguf.GGMLQuantizationType.F32:
            yield name, np.ascontiguousarray(data, dtype=np.float32), None
        elif raw_type == gguf.GGMLQuantizationType.F16:
            yield name, np.ascontiguousarray(data, dtype=np.float16), None
        else:
            yield name, quantize(np.ascontiguousarray(data), raw_type), raw_type


# ------------------------------------------------------------------ tokenizer
def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (its JSON in tokenizer.json), or None."""
    steps = _steps(pre)
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # single digits, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return _SPLIT_REGEXES.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _steps(pre: dict | None) -> list[dict]:
    """The steps of a pre-tokenizer's JSON (one unless it is a Sequence)."""
    pre = pre or {}
    return (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def gguf_vocabulary(tokenizer, vocab_size: int, source: str = "the model") -> dict:
    """What a GGUF file says about a byte-level BPE ``tokenizer`` for a model of ``vocab_size``
    embedding rows: tokens by id (ids no token has become ``[PAD<id>]``, type UNUSED), token types
    (added special tokens CONTROL, other added tokens USER_DEFINED), merges, the pre-tokenizer's
    name, special token ids, whether BOS/EOS are added, the chat template. InputError for another
    kind of tokenizer, or one with more tokens than the model has rows."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InputError(f"the tokenizer of {source} ({type(tokenizer).__name__}) has no tokenizers backend to export")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = any(step.get("type") == "ByteLevel" for step in _steps(spec.get("pre_tokenizer")))
    if model.get("type") != "BPE" or not byte_level:
        raise InputError(f"the tokenizer of {source} is a {model.get('type')} model"
                         f"{'' if byte_level else ' without byte-level pre-tokenization'}; GGUF export supports "
                         "byte-level BPE tokenizers (GPT-2 style: SmolLM2, Llama 3, Qwen)")
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if pre is None:
        raise InputError(f"the tokenizer of {source} splits text with a pre-tokenizer llama.cpp has no name for "
                         f"({json.dumps(spec.get('pre_tokenizer'))[:200]}); llama.cpp would tokenize differently")
    by_id = {index: (token, gguf.TokenType.NORMAL) for token, index in model["vocab"].items()}
    for added in spec.get("added_tokens") or ():
        by_id[added["id"]] = (added["content"],
                              gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    if by_id and max(by_id) >= vocab_size:
        raise InputError(f"the tokenizer of {source} has token id {max(by_id)}, beyond the model's {vocab_size} "
                         "embedding rows")
    tokens, types = zip(*(by_id.get(index, (f"[PAD{index}]", gguf.TokenType.UNUSED)) for index in range(vocab_size)))
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges") or ()]
    probe = tokenizer("a")["input_ids"]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    template = getattr(tokenizer, "chat_template", None)
    return {"tokens": list(tokens), "types": list(types), "merges": merges, "pre": pre, "special": special,
            "add_bos": special["bos"] is not None and probe[:1] == [special["bos"]],
            "add_eos": special["eos"] is not None and probe[-1:] == [special["eos"]] and len(probe) > 1,
            "chat_template": template}


def _write_vocabulary(writer, vocabulary: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_types(vocabulary["types"])
    writer.add_token_merges(vocabulary["merges"])
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for name, token_id in vocabulary["special"].items():
        if token_id is not None:
            adders[name](token_id)
    writer.add_add_bos_token(vocabulary["add_bos"])
    writer.add_add_eos_token(vocabulary["add_eos"])
    if vocabulary["chat_template"]:
        writer.add_chat_template(vocabulary["chat_template"])

