"""``slimlm eval``: held-out perplexity and tokens/s, optional greedy samples; ``--compare``
evaluates more models on the same blocks and prints them side by side; ``--speed`` measures
inference (``slimlm.speed``) of all of them in one run, the first (the teacher) the reference."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.errors import InputError
from slimlm.evaluate import EvalOptions


# The flags of the speed measurement (their own group); EvalOptions declares them all.
SPEED_FIELDS = ("speed", "speed_prompt_tokens", "speed_new_tokens", "speed_rounds")


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "eval", "held-out perplexity and tokens/s, optional greedy samples; --compare for a table; "
        "--speed for inference speed, teacher vs student",
        ["slimlm eval --model distilled/ --data heldout.jsonl",
         "OMP_NUM_THREADS=1 slimlm eval --model teacher.gguf --compare distilled/ --speed   # no --data: speed only",
         "slimlm eval --model teacher.gguf --compare student/ distilled/ --data heldout.jsonl "
         "--prompt 'The model' --prompt 'To prune'"])
    arguments.add_model_options(sub)
    sub.add_argument("--compare", nargs="+", metavar="M2", help="more models, evaluated on the same blocks")
    arguments.add_data_options(sub, required=False)
    EvalOptions.add_arguments(sub, skip=SPEED_FIELDS)
    sub.add_argument("--prompt", action="append", help="a prompt for a greedy sample (repeatable)")
    speed = sub.add_argument_group(
        "inference speed (--speed)",
        "greedy decoding of a fixed prompt with the KV cache, rounds alternating between the models:\n"
        "prefill and decode tokens/s at each batch size, time to first token, time per output token,\n"
        "memory (weights + KV cache) and size on disk, with ratios to the first model (the teacher).\n"
        "With --speed, --data is optional. On a shared CPU, run with OMP_NUM_THREADS=1 (and nothing\n"
        "else busy) for figures that compare.")
    EvalOptions.add_arguments(speed, skip=[field.name for field in EvalOptions.fields()
                                           if field.name not in SPEED_FIELDS])
    speed.add_argument("--speed-batch-sizes", type=arguments.int_list, default=[1, 8], metavar="B1,B2",
                       help="batch sizes (default 1,8)")
    sub.add_argument("--json", help="also write the results to this JSON file (with --speed: each model's "
                                    "figures under 'speed')")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing --json file of an earlier eval")
    sub.set_defaults(handler=run)


def eval_options(args) -> EvalOptions:
    """The ``EvalOptions`` the flags give, the repeated ``--prompt`` as its ``prompts``."""
    return EvalOptions.from_args(args, prompts=list(args.prompt or []))


def run(args) -> int:
    from slimlm import outputs
    from slimlm.evaluate import comparison_rows, evaluate_model, format_table

    options = eval_options(args)
    specs = [args.model] + list(args.compare or [])
    seen = {}
    for spec in specs:
        arguments.check_model_path(spec)
        identity = outputs.resolve(spec) if os.path.exists(spec) else spec
        if identity in seen:
            raise InputError(f"--compare {spec} is the same model as {seen[identity]}: each model is evaluated once")
        seen[identity] = spec
    if args.data is None and not options.speed:
        raise InputError("--data is required (held-out text to evaluate on), unless only --speed is asked")
    if args.data is not None:
        arguments.check_paths_exist(args.data, "data")
    if options.speed and any(size < 1 for size in args.speed_batch_sizes):
        raise InputError(f"--speed-batch-sizes {','.join(map(str, args.speed_batch_sizes))}: sizes must be >= 1")
    if args.json is not None:
        if os.path.isdir(args.json):
            raise InputError(f"--json {args.json} is a folder; it names the JSON file to write")
        args.json = outputs.check_output(args.json, args.overwrite, {"model": specs, "data": args.data},
                                         what="--json file")
    results = []
    tokenizer = None
    blocks = None
    # --speed alternates rounds between the models, so they stay loaded; perplexity alone loads one at a time.
    loaded = {}
    for spec in specs:
        model, model_tokenizer = arguments.load(spec, args)
        if tokenizer is None:
            tokenizer = model_tokenizer
            if args.data is not None:
                blocks = arguments.first_blocks(arguments.data_blocks(args, tokenizer, options.seq_len, model=model),
                                                options.max_blocks)
        elif model_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise InputError(f"{spec} has another tokenizer than {specs[0]}; its figures would not be comparable")
        if blocks is not None:
            results.append(evaluate_model(model, blocks, tokenizer=tokenizer, prompts=options.prompts,
                                          max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                                          spec=spec, progress=arguments.progress(args), name=spec))
        else:
            results.append({"name": spec, "spec": spec})
        if options.speed:
            loaded[spec] = model
        del model
    if blocks is not None:
        print(format_table(comparison_rows(results)))
        for prompt in options.prompts:
            print(f"\nprompt: {prompt}")
            for result in results:
                print(f"  {result['name']}: {' '.join(result['samples'][prompt].split())}")
    if options.speed:
        import torch

        from slimlm.speed import speed_report, speed_rows

        report = speed_report(loaded, specs={spec: spec for spec in specs}, tokenizer=tokenizer,
                              prompt_tokens=options.speed_prompt_tokens, new_tokens=options.speed_new_tokens,
                              batch_sizes=tuple(args.speed_batch_sizes), rounds=options.speed_rounds)
        if blocks is not None:
            print()
        print(format_table(speed_rows(report)))
        print(f"(greedy, {options.speed_prompt_tokens}-token prompt, {options.speed_new_tokens} new tokens, "
              f"{options.speed_rounds} rounds on {report['setup']['device']}, {torch.get_num_threads()} threads; "
              f"× = ratio to {specs[0]})")
        for result in results:
            result["speed"] = {**report["models"][result["name"]], "ratios": report["ratios"][result["name"]],
                               "setup": report["setup"]}
    if args.json:
        outputs.write_json(args.json, results, mark=True)
        print(f"results written to {args.json}")
    return EXIT_OK

