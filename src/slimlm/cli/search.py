"""``slimlm search``: the student shape that distills best at a budget (``slimlm.search``):
enumerate every legal shape, rank the closest by zero-shot loss, re-rank the best by a short
distillation. Any Hugging Face ``TrainingArguments`` flag passes through to the short
distillations, and under ``torchrun`` / ``accelerate launch`` the zero-shot scoring is split
across the processes (rank 0 writes).

A rerun into the same ``--out`` resumes (finished candidates are read back); ``--overwrite``
starts afresh and replaces the old output only once the new one is complete.
"""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK, positive_int
from slimlm.errors import InputError
from slimlm.models import DTYPE_NAMES
from slimlm.search.candidates import SearchSpace
from slimlm.search.options import SearchOptions

DEPTH_CHOICES = {"least_important": ("least_important",), "contiguous_block": ("contiguous_block",),
                 "both": ("least_important", "contiguous_block")}


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "search", "search the student shape that distills best at a parameter or memory budget",
        ["slimlm search --model M --scores scores/ --data 'docs/*.txt' --target-params 0.5 --out search/",
         "slimlm search --model M --scores scores/ --data train.jsonl --target-memory 1.5GiB --at-batch 8 "
         "--at-seq 4096 --dtype bfloat16 --top-n 20 --top-k 4 --rerank-tokens 200000 --out search/"])
    sub.add_argument("--model", required=True, help="the teacher: a folder, a .gguf file or a cached hub id")
    sub.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    arguments.add_trust_option(sub)
    sub.add_argument("--scores", required=True, help="folder written by slimlm importance for this model")
    arguments.add_data_options(sub)
    budget = sub.add_argument_group("budget (one of --target-params and --target-memory)")
    budget.add_argument("--target-params", help="a fraction of the model (0.5) or a count (70M, 1.2B, 70000000)")
    budget.add_argument("--target-memory", help="weights + KV cache, e.g. 1.5GiB, 800MB (needs --at-batch, --at-seq)")
    budget.add_argument("--at-batch", type=positive_int, help="batch size the memory budget's KV cache holds")
    budget.add_argument("--at-seq", type=positive_int, help="sequence length the memory budget's KV cache holds")
    budget.add_argument("--dtype", dest="memory_dtype", choices=DTYPE_NAMES,
                        help="dtype the memory budget counts weights and cache in (default: the checkpoint's)")
    budget.add_argument("--tolerance", type=arguments.positive_float, default=0.1,
                        help="a shape meets the budget within this fraction below it (default 0.1)")
    # The search space (a recipe's search.space mapping), flag by flag; SearchSpace holds the defaults.
    defaults = SearchSpace()
    space = sub.add_argument_group("search space")
    space.add_argument("--max-width-prune", type=float, default=defaults.max_width_prune,
                       help=f"most of each width axis pruned, in [0, 1) (default {defaults.max_width_prune})")
    space.add_argument("--max-depth-prune", type=float, default=defaults.max_depth_prune,
                       help=f"most of the layers pruned (default {defaults.max_depth_prune})")
    space.add_argument("--multiple-of", type=positive_int, default=defaults.multiple_of,
                       help=f"width grid (default {defaults.multiple_of})")
    space.add_argument("--depth-selection", choices=list(DEPTH_CHOICES),
                       default=next(name for name, choice in DEPTH_CHOICES.items()
                                    if choice == defaults.depth_selections),
                       help="which layers a shallower shape keeps dropping (both: each shape tried both ways)")
    SearchOptions.add_arguments(sub, group="calibration and ranking")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", required=True, help="folder for search.json, search.csv, winner_target.json, "
                                                  "search.png and winner/")
    sub.add_argument("--overwrite", action="store_true",
                     help="start afresh, replacing an earlier search in --out (default: resume it)")
    # The model loads in the dtype arguments.load picks for the device (scores are fingerprinted
    # on it); --dtype only says what the memory budget counts in.
    sub.set_defaults(handler=run, passthrough=True, dtype="auto")


def budget_fields(args) -> dict:
    """The ``slimlm.Budget`` fields the budget flags name (InputError naming the flags)."""
    if (args.target_params is None) == (args.target_memory is None):
        raise InputError("give exactly one of --target-params and --target-memory")
    if args.target_params is not None:
        if any(getattr(args, name) is not None for name in ("at_batch", "at_seq")):
            raise InputError("--at-batch and --at-seq size the KV cache of --target-memory; they mean nothing with "
                             "--target-params")
        return {"target_params": arguments.target_params(args.target_params), "tolerance": args.tolerance}
    missing = [flag for flag, value in (("--at-batch", args.at_batch), ("--at-seq", args.at_seq)) if value is None]
    if missing:
        raise InputError(f"--target-memory counts the KV cache too: give {' and '.join(missing)} "
                         "(the batch and sequence length it must hold)")
    return {"target_memory": args.target_memory, "at_batch": args.at_batch, "at_seq": args.at_seq,
            "dtype": args.memory_dtype, "tolerance": args.tolerance}


def search_options(args) -> SearchOptions:
    """The ``SearchOptions`` the flags give, the space flags as its ``space`` (InputError naming the flags)."""
    space = {"max_width_prune": args.max_width_prune, "max_depth_prune": args.max_depth_prune,
             "multiple_of": args.multiple_of, "depth_selections": list(DEPTH_CHOICES[args.depth_selection])}
    return SearchOptions.from_args(args, space=space)


def run(args) -> int:
    import contextlib

    from slimlm import outputs
    from slimlm.distill.training import training_arguments
    from slimlm.pipeline import importance
    from slimlm.pipeline.search import held_out
    from slimlm.search import Budget, search, search_candidates
    from slimlm.search.budget import parse_memory

    arguments.check_model_path(args.model)
    if not os.path.isdir(args.scores):
        raise InputError(f"scores folder {args.scores} does not exist (compute them with slimlm importance)")
    arguments.check_paths_exist(args.data, "data")
    budget = budget_fields(args)
    options = search_options(args)
    space = options.search_space()
    try:
        if "target_memory" in budget:
            parse_memory(budget["target_memory"])
    except ValueError as error:
        raise InputError(str(error)) from None
    split = held_out(options.held_out, SearchOptions.flag("held_out"))
    resume = not args.overwrite and os.path.isfile(os.path.join(outputs.resolve(args.out), "search.json"))
    args.out = outputs.check_output(args.out, args.overwrite or resume,
                                    {"model": args.model, "scores": args.scores, "data": args.data},
                                    related=[outputs.staging_path(args.out)])
    training_args = training_arguments(args.training_args, output_dir=outputs.staging_path(args.out),
                                       batch_size=options.batch_size, seed=args.seed)
    # Zero-shot scoring runs outside the Trainer: under a launcher each process scores on its own GPU.
    local_rank = os.environ.get("LOCAL_RANK")
    device = args.device
    if device is None and local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    model, tokenizer = arguments.load(args.model, args, device=device)
    if budget.get("target_memory") is not None and budget["dtype"] is None:
        budget["dtype"] = model.slimlm_source_dtype
    scores = importance.load_scores(args.scores, model=model)
    try:  # a budget no shape meets, --top-k over the candidates: before the data is read
        search_candidates(model, Budget(**budget), space=space, top_n=options.top_n, top_k=options.top_k,
                          scores=scores)
    except ValueError as error:
        raise InputError(str(error)) from None
    from slimlm.shards import Permutation

    data = arguments.data_blocks(args, tokenizer, options.seq_len, model=model)
    count = min(options.num_blocks, len(data))  # drawn as a recipe draws them: only those are read
    blocks = data.select(Permutation(len(data), args.seed)(range(count)) if count else [])
    writer = os.environ.get("RANK", "0") == "0"
    log = print if writer else (lambda line: None)
    # --overwrite: search into a staging folder swapped in only when complete; otherwise in
    # place, so that an interrupted search leaves what it finished for the rerun. Under a
    # launcher only rank 0 writes; the others read the record being resumed (none afresh).
    if args.overwrite:
        place = outputs.atomic_output(args.out) if writer else contextlib.nullcontext(None)
    else:
        place = contextlib.nullcontext(args.out)
    with place as out:
        result = search(model, scores, Budget(**budget), blocks, out=out, space=space, top_n=options.top_n,
                        top_k=options.top_k, held_out=split, seed=args.seed, rerank_tokens=options.rerank_tokens,
                        batch_size=options.batch_size, training_args=training_args, log=log)
    if writer:
        print(table(result, memory="target_memory" in budget))
        print(f"winner Target: {target_text(result.target)}")
        print(f"prune to it:   slimlm prune --model {args.model} --scores {args.scores} "
              f"{prune_flags(result.target)} --out student/")
        print(f"search written to {args.out}")
    return EXIT_OK


def table(result, *, memory: bool) -> str:
    """The ranked candidates, one line each (losses in nats/token, '-' where not computed)."""
    def loss(value):
        return "-" if value is None else f"{value:.4f}"

    header = ["rank", "candidate", "params"] + (["memory"] if memory else []) + ["zero-shot KD", "LM", "distilled KD"]
    lines = [header]
    for row in result.candidates:
        lines.append([str(row["rank"]), row["key"], f"{row['params']:,}"]
                     + ([f"{row['memory_bytes']:,}"] if memory else [])
                     + [loss(row["zero_shot_kd_loss"]), loss(row["lm_loss"]), loss(row["distill_loss"])])
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) if column < 2 else cell.rjust(width)
                               for column, (cell, width) in enumerate(zip(line, widths))) for line in lines)


def target_text(target) -> str:
    from dataclasses import asdict

    shown = {name: value for name, value in asdict(target).items()
             if name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                         "num_layers", "drop_layers") and value is not None}
    return ", ".join(f"{name}={value}" for name, value in shown.items())


def prune_flags(target) -> str:
    """The ``slimlm prune`` flags that give ``target``."""
    flags = {"--hidden-size": target.hidden_size, "--intermediate-size": target.intermediate_size,
             "--num-heads": target.num_attention_heads, "--num-kv-heads": target.num_key_value_heads,
             "--num-layers": target.num_layers,
             "--drop-layers": ",".join(map(str, target.drop_layers)) if target.drop_layers else None}
    return " ".join(f"{flag} {value}" for flag, value in flags.items() if value is not None)
