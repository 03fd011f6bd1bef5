"""``slimlm prune``: prune a model by its importance scores and save a standard checkpoint."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.errors import InputError
from slimlm.surgery.options import ReconstructOptions


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "prune", "prune a model by its importance scores and save a standard checkpoint",
        ["slimlm prune --model M --scores scores/ --target-params 0.5 --out student/",
         "slimlm prune --model M --scores scores/ --intermediate-size 768 --num-layers 24 --out student/",
         "slimlm prune --model M --drop-layers 3,4,5 --save-dtype float32 --out student/",
         "slimlm prune --model M --scores scores/ --target-params 0.5 --data 'docs/*.md' --out student/  "
         "# o_proj/down_proj refitted"])
    arguments.add_model_options(sub)
    sub.add_argument("--scores", help="folder written by slimlm importance (not needed for --drop-layers alone)")
    arguments.add_target_options(sub)
    group = sub.add_argument_group(
        "reconstruction (with --data: each kept o_proj/down_proj is refitted by least squares to the heads and "
        "neurons that stay, on calibration blocks of the data; slimlm.surgery.reconstruct)")
    arguments.add_data_options(group, required=False)
    ReconstructOptions.add_arguments(group)
    group.add_argument("--seq-len", type=arguments.positive_int, default=256, help="tokens per block (default 256)")
    sub.add_argument("--out", required=True)
    arguments.add_save_dtype_option(sub)
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.pipeline import importance, prune
    from slimlm.surgery import plan

    arguments.check_model_path(args.model)
    target = arguments.target(args)
    needs_scores = not (set(target) <= {"drop_layers"})
    if needs_scores and args.scores is None:
        raise InputError("--scores is required unless only --drop-layers is given (compute them with slimlm importance)")
    if args.scores is not None and not os.path.isdir(args.scores):
        raise InputError(f"scores folder {args.scores} does not exist")
    if args.data is not None:
        arguments.check_paths_exist(args.data, "data")
    args.out = outputs.check_output(args.out, args.overwrite,
                                    {"model": args.model, "scores": args.scores, "data": args.data})
    model, tokenizer = arguments.load(args.model, args, device="cpu")
    scores = importance.load_scores(args.scores, model=model) if args.scores is not None else None
    try:
        plan(model, target)  # a target the model cannot meet fails before the calibration pass
    except ValueError as error:
        raise InputError(str(error)) from None
    stats = None
    if args.data is not None:
        from slimlm.surgery import reconstruction_stats

        options = ReconstructOptions.from_args(args)
        blocks = arguments.first_blocks(arguments.data_blocks(args, tokenizer, args.seq_len, model=model),
                                        options.num_samples)
        stats = reconstruction_stats(model, blocks, num_samples=options.num_samples, ridge=options.ridge)
        print(f"reconstruction: o_proj/down_proj input statistics of {stats.tokens:,} tokens")
    _, the_plan = prune.prune_stage(model, scores, target, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                                    save_dtype=args.save_dtype, reconstruct=stats)
    print(the_plan.table())
    print(f"pruned model written to {args.out}")
    return EXIT_OK
