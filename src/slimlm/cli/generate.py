"""``slimlm generate``: sample synthetic distillation text from the teacher (JSONL, resumable)."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.distill.options import GenerationOptions
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "generate", "sample synthetic distillation text from the teacher (JSONL, resumable)",
        ["slimlm generate --teacher M --from-data 'docs/*.md' --num-prompts 256 --out synthetic.jsonl",
         "slimlm generate --teacher M --prompts prompts.jsonl --chat --temperature 0.7 --out synthetic.jsonl"])
    arguments.add_model_options(sub, flag="--teacher")
    sub.add_argument("--prompts", help="JSONL with a 'prompt' field, or a text file with one prompt per line")
    sub.add_argument("--from-data", nargs="+", metavar="D",
                     help="cut prompts (first sentences) from these texts, or from the documents of one token-shard "
                          "folder (slimlm tokenize)")
    sub.add_argument("--text-field", default="text")
    sub.add_argument("--out", required=True,
                     help="JSONL output (written beside it first, so an interrupted run is continued)")
    GenerationOptions.add_arguments(sub)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--overwrite", action="store_true")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.distill.generate import load_prompts, prompts_from_texts
    from slimlm.pipeline import synthetic
    from slimlm.pipeline.records import SYNTHETIC_DONE_SUFFIX

    options = GenerationOptions.from_args(args)
    arguments.check_model_path(args.teacher)
    if (args.prompts is None) == (args.from_data is None):
        raise InputError("give exactly one of --prompts P.jsonl and --from-data D")
    if args.prompts is not None:
        arguments.check_paths_exist([args.prompts], "prompts file")
    else:
        arguments.check_paths_exist(args.from_data, "data")
    if os.path.isdir(args.out):
        raise InputError(f"output {args.out} is a folder; --out names a JSONL file")
    inputs = {"teacher": args.teacher, "prompts file": args.prompts, "data": args.from_data}
    resolved = outputs.resolve(args.out)
    args.out = outputs.check_output(args.out, args.overwrite, inputs,
                                    related=[resolved + SYNTHETIC_DONE_SUFFIX, outputs.staging_path(resolved)])
    # Every input is read and checked before the old output is touched; it is replaced only
    # when the new one is complete. Token shards are decoded by the teacher's tokenizer, once loaded.
    shards = arguments.token_shards(args.from_data) if args.from_data is not None else None
    no_prompt = f"no prompt of at least 20 characters could be cut from {' '.join(args.from_data or [])}"
    if args.prompts is not None:
        prompts = load_prompts(args.prompts)
    elif shards is None:
        from slimlm.data import load_texts

        prompts = prompts_from_texts(load_texts(args.from_data, text_field=args.text_field),
                                     max_prompts=options.num_prompts)
        if not prompts:
            raise InputError(no_prompt)
    teacher, tokenizer = arguments.load(args.teacher, args)
    if shards is not None:
        shards.check(tokenizer=tokenizer)
        try:
            prompts = synthetic.shard_prompts(shards, tokenizer, options.num_prompts)
        except InputError:
            raise InputError(no_prompt) from None
    prompts = prompts[: options.num_prompts]
    dataset = synthetic.generate_stage(teacher, tokenizer, prompts, args.out, **options.sampling(args.seed),
                                       progress=arguments.progress(args))
    print(f"{len(dataset)} generations in {args.out}")
    return EXIT_OK
