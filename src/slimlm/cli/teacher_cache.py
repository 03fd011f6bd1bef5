"""``slimlm teacher-cache``: the teacher's top-k log-probabilities on blocks of token shards,
computed once and stored compressed, for ``slimlm distill --teacher-cache`` to learn from with no
teacher loaded (``slimlm.pipeline.teacher_cache``)."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.distill.options import DistillOptions, TeacherCacheOptions
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "teacher-cache", "cache the teacher's top-k log-probabilities on blocks of token shards "
        "(compressed; resumable) for a distillation with no teacher loaded",
        ["slimlm teacher-cache --teacher M --data shards/ --seq-len 512 --k 64 --out cache/",
         "slimlm distill --student pruned/ --teacher-cache cache/ --data shards/ --out distilled/"])
    arguments.add_model_options(sub, flag="--teacher")
    sub.add_argument("--data", required=True, help="token shards (slimlm tokenize) the cache's blocks are cut from")
    defaults = DistillOptions()
    sub.add_argument("--seq-len", type=arguments.positive_int, default=defaults.seq_len,
                     help=f"tokens per block: the distillation's seq_len (default {defaults.seq_len})")
    sub.add_argument("--num-blocks", type=arguments.positive_int,
                     help="blocks to cache, drawn by a seeded order (default: every block of the shards)")
    sub.add_argument("--temperature", type=arguments.positive_float, default=defaults.temperature,
                     help=f"the distillation's temperature (default {defaults.temperature})")
    sub.add_argument("--seed", type=int, default=0, help="seed of the blocks' order (default 0)")
    TeacherCacheOptions.add_arguments(sub)
    sub.add_argument("--out", required=True)
    sub.add_argument("--overwrite", action="store_true", help="replace an earlier output of slimlm")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.models import load_model, load_tokenizer, resolve_dtype
    from slimlm.pipeline.teacher_cache import teacher_cache_stage

    options = TeacherCacheOptions.from_args(args)
    arguments.check_model_path(args.teacher)
    shards = arguments.token_shards(args.data)
    if shards is None:
        raise InputError(f"--data {args.data}: not token shards; make them with slimlm tokenize")
    args.out = outputs.check_output(args.out, args.overwrite, {"teacher": args.teacher, "data": args.data},
                                    what="teacher cache")
    dtype = resolve_dtype(args.dtype, args.device)
    try:
        teacher = load_model(args.teacher, dtype=dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        tokenizer = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
    except FileNotFoundError as error:
        raise InputError(f"teacher: {error}") from None
    shards.check(tokenizer=tokenizer)
    teacher_cache_stage(teacher, tokenizer, shards, args.out, options, seq_len=args.seq_len,
                        num_blocks=args.num_blocks, temperature=args.temperature, seed=args.seed)
    size = sum(entry.stat().st_size for entry in os.scandir(args.out) if entry.is_file())
    print(f"teacher cache written to {args.out} ({size / 2**20:.1f} MiB)")
    return EXIT_OK
