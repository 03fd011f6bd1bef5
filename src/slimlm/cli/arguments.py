"""What the commands share: the parser class, argument types and option groups, and the
checks and loaders for the inputs their flags name (a model, data files, a target).

Commands return an exit code: ``EXIT_OK``, ``EXIT_FAILURE`` (a runtime failure) or
``EXIT_USAGE`` (bad input; ``InputError`` becomes it in ``slimlm.cli.main``).
"""
from __future__ import annotations

import argparse
import math
import os

from slimlm.errors import InputError
from slimlm.models import DTYPE_NAMES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Parser(argparse.ArgumentParser):
    """argparse with examples shown verbatim and no abbreviated flags (so HF TrainingArguments
    flags pass through ``distill`` untouched)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_command(subparsers, name: str, help_text: str, example_lines) -> Parser:
    """A subcommand's parser: its help, its examples and ``--no-progress``."""
    sub = subparsers.add_parser(name, help=help_text, description=help_text, epilog=examples(*example_lines))
    sub.add_argument("--no-progress", action="store_true", help="no progress bars")
    return sub


# ------------------------------------------------------------------ types
def csv(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def int_list(value: str) -> list[int]:
    try:
        numbers = [int(item) for item in csv(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not numbers:
        raise argparse.ArgumentTypeError(f"expected at least one layer index, got {value!r}")
    return numbers


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value!r}")
    return number


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def at_least_two(value: str) -> int:
    number = positive_int(value)
    if number < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {value!r}")
    return number


# ---------------------------------------------------------- option groups
def add_model_options(parser, *, flag="--model", required=True,
                      help_text="model: a folder, a .gguf file or a cached hub id"):
    parser.add_argument(flag, required=required, help=help_text)
    parser.add_argument("--dtype", default="auto", choices=SAVE_DTYPES,
                        help="weights dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    add_trust_option(parser)


# "auto" and the one dtype table's names (``import slimlm`` has loaded slimlm.models already).
SAVE_DTYPES = ("auto", *DTYPE_NAMES)


def add_save_dtype_option(parser, *, default="auto"):
    parser.add_argument("--save-dtype", default=default, choices=SAVE_DTYPES,
                        help="dtype of the saved checkpoint (auto: the dtype the source model declares, e.g. "
                             "bfloat16 for SmolLM2; training and --dtype are unaffected)")


def add_trust_option(parser):
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships (config.json auto_map); off by default: "
                             "only do this for a model whose code you have read")


def add_data_options(parser, *, required=True):
    parser.add_argument("--data", nargs="+", required=required, metavar="D",
                        help="text files, JSONL/Parquet files, saved datasets or globs (slimlm.data.load_texts), or "
                             "one token-shard folder written by slimlm tokenize with the model's tokenizer (only the "
                             "blocks used are read)")
    parser.add_argument("--text-field", default="text", help="field of JSONL/Parquet records holding the text")


def add_target_options(parser):
    group = parser.add_argument_group("target (a budget, explicit sizes, or layers to drop)")
    group.add_argument("--target-params", help="parameter budget: a fraction (0.5) or a count (70M, 1.2B, 70000000)")
    group.add_argument("--hidden-size", type=positive_int)
    group.add_argument("--intermediate-size", type=positive_int)
    group.add_argument("--num-heads", type=positive_int, help="query heads per layer")
    group.add_argument("--num-kv-heads", type=positive_int)
    group.add_argument("--num-layers", type=positive_int, help="layers to keep (which: by the scores' layer axis)")
    group.add_argument("--drop-layers", type=int_list, help="layer indices to drop, e.g. 3,4,5")


def target(args) -> dict:
    """The ``slimlm.surgery.Target`` fields the target options name."""
    fields = {}
    if args.target_params is not None:
        fields["target_params"] = target_params(args.target_params)
    for name in ("hidden_size", "intermediate_size", "num_layers"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.num_heads is not None:
        fields["num_attention_heads"] = args.num_heads
    if args.num_kv_heads is not None:
        fields["num_key_value_heads"] = args.num_kv_heads
    if args.drop_layers is not None:
        fields["drop_layers"] = args.drop_layers
    if not fields:
        raise InputError("say what to prune to: --target-params, a size flag (--hidden-size …) or --drop-layers")
    return fields


def target_params(value: str) -> float | int | str:
    """'0.5' is a fraction of the model (in (0, 1]); '70M', '1.2B' and '70000000' are counts.
    A number above 1 that is not whole (1.5) is neither: refused rather than read as 1."""
    try:
        number = float(value)
    except ValueError:
        return value  # '70M': the planner parses it
    if not math.isfinite(number) or number <= 0:
        raise InputError(f"--target-params {value}: expected a fraction in (0, 1] or a parameter count")
    if number <= 1.0:
        return number
    if not number.is_integer():
        raise InputError(f"--target-params {value}: a fraction must be in (0, 1] and a count a whole number of "
                         "parameters (e.g. 70M, 70000000)")
    return int(number)


# ------------------------------------------------------------ progress
def progress(args) -> bool:
    return not getattr(args, "no_progress", False)


def quiet_progress() -> None:
    """--no-progress also silences transformers' own bars (weight loading, GGUF conversion)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# -------------------------------------------------------------- inputs
def load(spec: str, args, *, device=None):
    """(model, tokenizer), with a missing path or unknown id as an InputError."""
    from slimlm.models import default_device, load_model, load_tokenizer, resolve_dtype

    device = device or args.device or default_device()
    try:
        model = load_model(spec, dtype=resolve_dtype(args.dtype, device), device=device,
                           trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(spec, trust_remote_code=args.trust_remote_code)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
    return model, tokenizer


def token_shards(data):
    """The ``slimlm.shards.TokenShards`` ``data`` (a flag's value: a path, or a one-path list) names
    when it is a folder of token shards (``slimlm tokenize``), else None (text sources)."""
    from slimlm.shards import MANIFEST, TokenShards

    paths = data if isinstance(data, (list, tuple)) else [data]
    if len(paths) != 1 or not os.path.isfile(os.path.join(str(paths[0]), MANIFEST)):
        return None
    return TokenShards(str(paths[0]))


def training_data(args):
    """``--data``: its token shards when it names a shard folder (read from disk as needed), else
    the texts of its sources (in memory: for a small corpus; tokenise a large one first)."""
    shards = token_shards(args.data)
    return shards if shards is not None else texts(args)


def data_blocks(args, tokenizer, seq_len: int, *, model):
    """``--data`` cut into blocks of ``seq_len`` tokens as ``tokenize_blocks(pack=True)`` cuts its
    texts (the last block padded). Token shards give a lazy ``slimlm.shards.ShardBlocks`` that
    reads only the blocks ``select``-ed, once checked to be ``tokenizer``'s (InputError if not);
    texts give their ``TokenBlocks``. Both have ``len`` and ``select(indices) -> TokenBlocks``.
    InputError when ``seq_len`` is above ``model``'s limit."""
    from slimlm.shards import token_blocks

    shards = token_shards(args.data)
    if shards is not None:
        shards.check(tokenizer=tokenizer)
    return token_blocks(shards if shards is not None else texts(args), tokenizer, seq_len, model=model)


def first_blocks(blocks, count: int):
    """The first ``count`` of ``blocks`` (all, if fewer), as ``TokenBlocks``."""
    return blocks.select(range(min(len(blocks), count)))


def texts(args) -> list[str]:
    from slimlm.data import load_texts

    return load_texts(args.data, text_field=args.text_field)


def check_paths_exist(paths, what: str) -> None:
    import glob

    for path in paths:
        if not (os.path.exists(path) or glob.has_magic(path) and glob.glob(path, recursive=True)):
            raise InputError(f"{what} {path} does not exist")


def check_model_path(spec: str) -> None:
    """Fail before any import-heavy work when a model path that looks local is missing, or is a
    folder named ``*.gguf`` without config.json (one with it loads as a model folder)."""
    if (spec.rstrip(os.sep).endswith(".gguf") and os.path.isdir(spec)
            and not os.path.isfile(os.path.join(spec, "config.json"))):
        raise InputError(f"model {spec} is a folder, not a GGUF file (nor a Hugging Face model folder: "
                         "it has no config.json)")
    if (spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or os.sep in spec.rstrip(os.sep)
            and spec.count("/") != 1) and not os.path.exists(spec):
        raise InputError(f"model {spec} does not exist")
