"""``slimlm importance``: score heads, KV groups, neurons, hidden channels and layers."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.importance.options import ImportanceOptions


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "importance", "score heads, KV groups, neurons, hidden channels and layers on calibration text",
        ["slimlm importance --model SmolLM2.gguf --data 'docs/*.md' --num-samples 256 --seq-len 512 --out scores/",
         "slimlm importance --model model/ --data train.jsonl --metrics activation,wanda "
         "--depth block_influence,loss_drop --out scores/"])
    arguments.add_model_options(sub)
    arguments.add_data_options(sub)
    sub.add_argument("--out", required=True, help="folder for scores.safetensors + meta.json")
    ImportanceOptions.add_arguments(sub)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--plot", action="store_true", help="also write importance.png")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.data import TokenBlocks
    from slimlm.pipeline import importance

    options = ImportanceOptions.from_args(args)
    arguments.check_model_path(args.model)
    arguments.check_paths_exist(args.data, "data")
    args.out = outputs.check_output(args.out, args.overwrite, {"model": args.model, "data": args.data})
    model, tokenizer = arguments.load(args.model, args)
    blocks = arguments.data_blocks(args, tokenizer, options.seq_len, model=model)
    if not isinstance(blocks, TokenBlocks):  # token shards: only the calibration blocks drawn are read
        blocks = blocks.shards.sample_blocks(options.num_samples, options.seq_len, args.seed, pad_last=True)
    scores = importance.importance_stage(model, blocks, args.out, options, seed=args.seed,
                                         progress=arguments.progress(args))
    scores.summary()
    if args.plot:
        print(f"plot: {scores.plot(os.path.join(args.out, 'importance.png'))}")
    print(f"scores written to {args.out}")
    return EXIT_OK
