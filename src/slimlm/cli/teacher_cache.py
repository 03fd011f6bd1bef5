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
    arguments.add_model_options(sub, flag="--teacher", help_text="teacher model: a folder, a .gguf file or a cached "
                                "hub id (its tokenizer is the cache's; with --server or --vllm, the model served)")
    served = sub.add_argument_group("a served teacher (logit distillation; temperature 1)")
    served.add_argument("--server", metavar="URL", help="an OpenAI-compatible server (vllm serve) running the teacher: "
                                                        "its prompt_logprobs make the cache (e.g. http://host:8000)")
    served.add_argument("--server-model", help="the model's name on --server (default: --teacher)")
    served.add_argument("--vllm", action="store_true", help="run --teacher with vLLM in this process (tensor "
                                                           "parallel over this machine's GPUs; needs vllm installed)")
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
                                    related=[outputs.resolve(args.out) + ".inputs.json"],
                                    what="teacher cache")
    if args.server and args.vllm:
        raise InputError("give --server or --vllm, not both")
    try:
        tokenizer = load_tokenizer(args.teacher, trust_remote_code=args.trust_remote_code)
        if args.server or args.vllm:
            teacher = _served(args, tokenizer)
        else:
            teacher = load_model(args.teacher, dtype=resolve_dtype(args.dtype, args.device), device=args.device,
                                 trust_remote_code=args.trust_remote_code)
    except FileNotFoundError as error:
        raise InputError(f"teacher: {error}") from None
    shards.check(tokenizer=tokenizer)
    teacher_cache_stage(teacher, tokenizer, shards, args.out, options, seq_len=args.seq_len,
                        num_blocks=args.num_blocks, temperature=args.temperature, seed=args.seed)
    size = sum(entry.stat().st_size for entry in os.scandir(args.out) if entry.is_file())
    print(f"teacher cache written to {args.out} ({size / 2**20:.1f} MiB)")
    return EXIT_OK


def _served(args, tokenizer):
    """The ``ServedTeacher`` of ``--server`` or ``--vllm``."""
    from slimlm.distill.served import OpenAIServerEngine, VLLMEngine
    from slimlm.pipeline.teacher_cache import ServedTeacher
    from slimlm.shards import vocab_bound

    if args.temperature != 1:
        raise InputError(f"--temperature {args.temperature}: a served teacher's log-probs are at temperature 1")
    if args.server:
        name = args.server_model or str(args.teacher)
        engine = OpenAIServerEngine(args.server, name, vocab_size=vocab_bound(tokenizer))
        return ServedTeacher(engine, f"{args.server} {name}")
    return ServedTeacher(VLLMEngine(str(args.teacher), trust_remote_code=args.trust_remote_code),
                         f"vllm {os.path.abspath(args.teacher)}")
