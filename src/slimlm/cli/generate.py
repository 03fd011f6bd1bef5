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
         "slimlm generate --teacher M --prompts prompts.jsonl --chat --temperature 0.7 --out synthetic.jsonl",
         "slimlm generate --teacher M --chat --sources general=0.8,data=0.2 --from-data tokens/train "
         "--num-prompts 2048 --keep-topk 64 --out synthetic.jsonl"])
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
    from slimlm.pipeline import synthetic
    from slimlm.pipeline.records import SYNTHETIC_DONE_SUFFIX

    from slimlm.distill.prompts import parse_sources

    given_sources = args.sources != GenerationOptions().sources
    if args.prompts is not None and given_sources:
        raise InputError("give --prompts P or --sources (which may name file:P), not both")
    if args.prompts is not None:
        arguments.check_paths_exist([args.prompts], "prompts file")
        args.sources = f"file:{args.prompts}=1"
    options = GenerationOptions.from_args(args)
    arguments.check_model_path(args.teacher)
    kinds = {source.kind for source in parse_sources(options.sources) if source.weight > 0}
    if "data" in kinds and args.from_data is None:
        raise InputError("--sources names data (the default): give --from-data D to cut prompts from, or "
                         "--prompts P, or other --sources")
    if args.from_data is not None:
        arguments.check_paths_exist(args.from_data, "data")
    if os.path.isdir(args.out):
        raise InputError(f"output {args.out} is a folder; --out names a JSONL file")
    inputs = {"teacher": args.teacher, "prompts file": args.prompts, "data": args.from_data}
    resolved = outputs.resolve(args.out)
    cache = resolved + synthetic.CACHE_SUFFIX
    args.out = outputs.check_output(args.out, args.overwrite, inputs,
                                    related=[resolved + SYNTHETIC_DONE_SUFFIX, outputs.staging_path(resolved), cache,
                                             outputs.staging_path(cache)])
    # Every input is read and checked before the old output is touched; it is replaced only
    # when the new one is complete. Token shards are decoded by the teacher's tokenizer, once loaded.
    shards = arguments.token_shards(args.from_data) if args.from_data is not None else None
    data = None
    if args.from_data is not None and shards is None:
        from slimlm.data import load_texts

        data = load_texts(args.from_data, text_field=args.text_field)
    teacher, tokenizer = arguments.load(args.teacher, args)
    if shards is not None:
        shards.check(tokenizer=tokenizer)
        data = shards
    try:
        prompts = synthetic.source_prompts(options.sources, options.num_prompts, seed=args.seed, data=data,
                                           tokenizer=tokenizer)
    except InputError as error:
        if "data" in kinds and "no text" in str(error) or "no prompts could be cut" in str(error):
            raise InputError(f"no prompt of at least 20 characters could be cut from "
                             f"{' '.join(args.from_data or [])}") from None
        raise
    dataset = synthetic.generate_stage(teacher, tokenizer, prompts, args.out, **options.sampling(args.seed),
                                       writing=options.writing(str(next(teacher.parameters()).device.type)),
                                       model_path=args.teacher, progress=arguments.progress(args))
    kept = ", ".join(f"{count} {reason}" for reason, count in dataset.counts.items())
    print(f"{len(dataset)} generations in {args.out} ({kept})"
          + (f"; the teacher's top-k in {args.out}{synthetic.CACHE_SUFFIX}/" if dataset.caches else ""))
    return EXIT_OK
