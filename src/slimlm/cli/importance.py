"""``slimlm importance``: score heads, KV groups, neurons, hidden channels and layers."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "importance", "score heads, KV groups, neurons, hidden channels and layers on calibration text",
        ["slimlm importance --model SmolLM2.gguf --data 'docs/*.md' --num-samples 256 --seq-len 512 --out scores/",
         "slimlm importance --model model/ --data train.jsonl --metrics activation,wanda "
         "--depth block_influence,loss_drop --out scores/"])
    arguments.add_model_options(sub)
    arguments.add_data_options(sub)
    sub.add_argument("--out", required=True, help="folder for scores.safetensors + meta.json")
    sub.add_argument("--num-samples", type=arguments.positive_int, default=1024,
                     help="calibration blocks (default 1024)")
    sub.add_argument("--seq-len", type=arguments.positive_int, default=2048, help="tokens per block (default 2048)")
    sub.add_argument("--batch-size", type=arguments.positive_int, default=8)
    sub.add_argument("--metrics", type=arguments.csv, default=["activation"],
                     help="width metrics: activation,wanda,magnitude")
    sub.add_argument("--depth", type=arguments.csv, default=["block_influence", "loss_drop"],
                     help="depth metrics: block_influence,loss_drop (empty string: none)")
    sub.add_argument("--loss-drop-samples", type=arguments.positive_int, default=None,
                     help="cap on the samples loss_drop uses")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--plot", action="store_true", help="also write importance.png")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.data import tokenize_blocks
    from slimlm.pipeline import importance

    arguments.check_model_path(args.model)
    arguments.check_paths_exist(args.data, "data")
    args.out = outputs.check_output(args.out, args.overwrite, {"model": args.model, "data": args.data})
    model, tokenizer = arguments.load(args.model, args)
    blocks = tokenize_blocks(arguments.texts(args), tokenizer, args.seq_len, model=model)
    scores = importance.importance_stage(model, blocks, args.out, metrics=args.metrics, depth=args.depth,
                                         num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                                         loss_drop_samples=args.loss_drop_samples,
                                         progress=arguments.progress(args))
    scores.summary()
    if args.plot:
        print(f"plot: {scores.plot(os.path.join(args.out, 'importance.png'))}")
    print(f"scores written to {args.out}")
    return EXIT_OK
