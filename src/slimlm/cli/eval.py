"""``slimlm eval``: held-out perplexity and tokens/s, optional greedy samples; ``--compare``
evaluates more models on the same blocks and prints them side by side."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    positive_int = arguments.positive_int
    sub = arguments.add_command(
        subparsers, "eval", "held-out perplexity and tokens/s, optional greedy samples; --compare for a table",
        ["slimlm eval --model distilled/ --data heldout.jsonl",
         "slimlm eval --model teacher.gguf --compare student/ distilled/ --data heldout.jsonl "
         "--prompt 'The model' --prompt 'To prune'"])
    arguments.add_model_options(sub)
    sub.add_argument("--compare", nargs="+", metavar="M2", help="more models, evaluated on the same blocks")
    arguments.add_data_options(sub)
    sub.add_argument("--seq-len", type=positive_int, default=512)
    sub.add_argument("--max-blocks", type=positive_int, default=64)
    sub.add_argument("--batch-size", type=positive_int, default=8)
    sub.add_argument("--prompt", action="append", help="a prompt for a greedy sample (repeatable)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=32)
    sub.add_argument("--json", help="also write the results to this JSON file")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --json file of an earlier eval")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.data import tokenize_blocks
    from slimlm.evaluate import comparison_rows, evaluate_model, format_table

    specs = [args.model] + list(args.compare or [])
    for spec in specs:
        arguments.check_model_path(spec)
    arguments.check_paths_exist(args.data, "data")
    if args.json is not None:
        if os.path.isdir(args.json):
            raise InputError(f"--json {args.json} is a folder; it names the JSON file to write")
        outputs.check_output(args.json, args.overwrite, {"model": specs, "data": args.data}, what="--json file")
    prompts = list(args.prompt or [])
    results = []
    tokenizer = None
    blocks = None
    for spec in specs:
        model, model_tokenizer = arguments.load(spec, args)
        if tokenizer is None:
            tokenizer = model_tokenizer
            blocks = tokenize_blocks(arguments.texts(args), tokenizer, args.seq_len, model=model)
            blocks = blocks.select(range(min(len(blocks), args.max_blocks)))
        elif model_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{spec} has another tokenizer than {specs[0]}; perplexities would not be comparable")
        results.append(evaluate_model(model, blocks, tokenizer=tokenizer, prompts=prompts,
                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, spec=spec,
                                      progress=arguments.progress(args), name=spec))
        del model
    print(format_table(comparison_rows(results)))
    for prompt in prompts:
        print(f"\nprompt: {prompt}")
        for result in results:
            print(f"  {result['name']}: {' '.join(result['samples'][prompt].split())}")
    if args.json:
        outputs.write_json(args.json, results)
        print(f"results written to {args.json}")
    return EXIT_OK
