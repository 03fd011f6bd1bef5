"""``slimlm export``: a model folder (a student) as one GGUF file for llama.cpp and the tools
built on it (``slimlm.export_gguf``)."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    from slimlm.export import OUTTYPES

    sub = arguments.add_command(
        subparsers, "export", "write a model folder as one GGUF file (llama.cpp, Ollama, LM Studio)",
        ["slimlm export --model distilled/ --gguf student.gguf",
         "slimlm export --model distilled/ --gguf student-q8.gguf --outtype q8_0 --overwrite"])
    sub.add_argument("--model", required=True, help="model folder with its tokenizer (slimlm prune / distill)")
    sub.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    sub.add_argument("--outtype", default="f32", choices=OUTTYPES,
                     help="dtype of the matrices (norms and biases stay f32; q8_0 rows not a multiple of 32 are f16)")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing GGUF file")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.export import export_gguf

    arguments.check_model_path(args.model)
    if not os.path.isdir(args.model):
        raise InputError(f"model {args.model} is not a model folder (export a folder written by slimlm prune or "
                         "distill, or any Hugging Face model folder)")
    if not args.gguf.endswith(".gguf"):
        raise InputError(f"--gguf {args.gguf}: the output file's name must end in .gguf")
    if os.path.isdir(args.gguf):
        raise InputError(f"--gguf {args.gguf} is a folder; it names the GGUF file to write")
    args.gguf = outputs.check_output(args.gguf, args.overwrite, {"model": args.model}, what="--gguf file")
    path = export_gguf(args.model, args.gguf, outtype=args.outtype, overwrite=args.overwrite)
    print(f"GGUF ({args.outtype}) written to {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return EXIT_OK
