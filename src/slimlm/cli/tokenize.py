"""``slimlm tokenize``: tokenise a corpus once into memory-mapped token shards (``slimlm.shards``)."""
from __future__ import annotations

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.shards import TokenizeOptions


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "tokenize", "tokenise text once into memory-mapped token shards (resumable)",
        ["slimlm tokenize --tokenizer SmolLM2.gguf --data 'corpus/*.jsonl' --out shards/",
         "slimlm tokenize --tokenizer model/ --data train.parquet --num-proc 8 --shard-tokens 50000000 --out shards/"])
    sub.add_argument("--tokenizer", required=True, help="model whose tokenizer to use: a folder, a .gguf file or a "
                                                        "cached hub id")
    arguments.add_trust_option(sub)
    sub.add_argument("--data", nargs="+", required=True, metavar="D",
                     help="text files, JSONL/Parquet files, saved datasets or globs (slimlm.data.load_texts); "
                          "hub:NAME[:CONFIG] streams a hub dataset when `datasets` is installed")
    sub.add_argument("--out", required=True, help="folder for manifest.json, tokens-*.bin and docs-*.bin")
    TokenizeOptions.add_arguments(sub)
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.shards import local_sources, write_shards

    options = TokenizeOptions.from_args(args)
    arguments.check_model_path(args.tokenizer)
    local = local_sources(args.data)
    arguments.check_paths_exist(local, "data")
    args.out = outputs.check_output(args.out, args.overwrite, {"tokenizer": args.tokenizer, "data": local},
                                    related=[outputs.staging_path(args.out)])
    tokenizer = _load_tokenizer(args)
    shards = write_shards(args.data, tokenizer, args.out, options=options, overwrite=args.overwrite,
                          progress=arguments.progress(args))
    disk = sum(shard["num_tokens"] for shard in shards.manifest["shards"]) * shards.dtype.itemsize
    print(f"{shards.num_tokens:,} tokens ({shards.num_documents:,} documents, {shards.dtype.name}, "
          f"{disk / 2**20:.1f} MiB of token files) in {shards.num_shards} shard(s) in {args.out}")
    return EXIT_OK


def _load_tokenizer(args):
    from slimlm.errors import InputError
    from slimlm.models import load_tokenizer

    try:
        return load_tokenizer(args.tokenizer, trust_remote_code=args.trust_remote_code)
    except FileNotFoundError as error:
        raise InputError(str(error)) from None
