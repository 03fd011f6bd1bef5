"""``slimlm gradual``: prune the teacher to a parameter budget in steps, distilling after each
cut (``slimlm.pipeline.gradual``): each step scores the current student, searches its next
shape at the step's budget and distills it from the teacher with the step's share of
``--max-tokens``. Any Hugging Face ``TrainingArguments`` flag passes through to the
distillations.

A rerun into the same ``--out`` resumes (finished steps are read back, an unfinished one
continues); ``--overwrite`` starts afresh and replaces the old output only once the new one is
complete.
"""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.distill.options import DistillOptions
from slimlm.errors import InputError
from slimlm.evaluate import EvalOptions
from slimlm.importance.options import ImportanceOptions
from slimlm.search.options import SearchOptions
from slimlm.search.schedule import ScheduleOptions

# Search and importance take the distillation's --seq-len and --batch-size (one flag each).
SHARED = ("seq_len", "batch_size")


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "gradual", "prune to a parameter budget in steps, distilling after each cut (each step's shape "
        "searched at its budget)",
        ["slimlm gradual --teacher M --data 'docs/*.txt' --heldout heldout.txt --target-params 0.5 --steps 2 "
         "--max-tokens 2000000 --out gradual/",
         "slimlm gradual --teacher M --data shards/ --target-params 0.25 --steps 3 --token-split back "
         "--max-width-prune 0.7 --max-depth-prune 0.5 --max-tokens 8000000 --bf16 true --out gradual/"])
    arguments.add_model_options(sub, flag="--teacher", help_text="teacher model: a folder, a .gguf file or a cached "
                                                                 "hub id")
    arguments.add_data_options(sub)
    sub.add_argument("--heldout", nargs="+", metavar="H",
                     help="held-out text (as --data) whose perplexity is measured after each cut and step, on its "
                          f"first {EvalOptions().max_blocks} blocks of --seq-len tokens")
    sub.add_argument("--general", nargs="+", metavar="G", help="a held-out set of another register, measured too")
    budget = sub.add_argument_group("budget")
    budget.add_argument("--target-params", required=True,
                        help="the final budget: a fraction of the teacher (0.5) or a count (70M, 70000000)")
    budget.add_argument("--tolerance", type=arguments.positive_float, default=0.1,
                        help="a shape meets a step's budget within this fraction below it (default 0.1)")
    ScheduleOptions.add_arguments(sub, group="schedule")
    DistillOptions.add_arguments(sub, group="distillation (--seq-len and --batch-size also for scoring and search)")
    SearchOptions.add_arguments(sub, skip=SHARED, group="search")
    space = sub.add_argument_group("search space (the teacher's floors, kept by every step)")
    space.add_argument("--max-width-prune", type=float, help="most of each width axis pruned, in [0, 1) "
                                                            "(default: SearchSpace's)")
    space.add_argument("--max-depth-prune", type=float, help="most of the layers pruned (default: SearchSpace's)")
    space.add_argument("--multiple-of", type=arguments.positive_int, help="width grid (default: SearchSpace's)")
    ImportanceOptions.add_arguments(sub, skip=SHARED, group="scoring")
    sub.add_argument("--seed", type=int, default=0)
    arguments.add_save_dtype_option(sub)
    sub.add_argument("--out", required=True, help="folder for steps/step-<k>/ (each step's student), "
                                                  "steps/step-<k>.work/ and gradual.json")
    sub.add_argument("--overwrite", action="store_true",
                     help="start afresh, replacing an earlier output in --out (default: resume it)")
    sub.set_defaults(handler=run, passthrough=True)


def options(args) -> dict:
    """The options dataclasses the flags give (InputError naming the flag)."""
    space = {name: getattr(args, name) for name in ("max_width_prune", "max_depth_prune", "multiple_of")
             if getattr(args, name) is not None}
    # The flags that pass through are TrainingArguments for the distillations and the search's
    # short ones alike (a recipe's distill.training_args).
    distill = DistillOptions.from_args(args, training_args=training_flags(args.training_args))
    return {"schedule": ScheduleOptions.from_args(args), "distill": distill,
            "search": SearchOptions.from_args(args, space=space), "importance": ImportanceOptions.from_args(args),
            "evaluation": EvalOptions(seq_len=distill.seq_len, batch_size=distill.batch_size)}


def training_flags(flags: list[str]) -> dict:
    """``--name value`` / ``--name=value`` flags as {name: value} (a flag without a value: "true")."""
    values, index = {}, 0
    while index < len(flags):
        flag = flags[index]
        if not flag.startswith("--"):
            raise InputError(f"unexpected argument {flag!r}: TrainingArguments flags are --name value")
        name, equals, value = flag[2:].partition("=")
        if not equals:
            following = flags[index + 1] if index + 1 < len(flags) else None
            value = "true" if following is None or following.startswith("--") else following
            index += 0 if following is None or following.startswith("--") else 1
        values[name] = value
        index += 1
    return values


def run(args) -> int:
    import contextlib

    from slimlm import outputs
    from slimlm.pipeline.gradual import RECORD_FILE, gradual_prune, gradual_report_lines, schedule_plan

    arguments.check_model_path(args.teacher)
    arguments.check_paths_exist(args.data, "data")
    for flag, paths in (("held-out data", args.heldout), ("general held-out data", args.general)):
        if paths is not None:
            arguments.check_paths_exist(paths, flag)
    chosen = options(args)
    target = {"target_params": arguments.target_params(args.target_params), "tolerance": args.tolerance}
    resume = not args.overwrite and os.path.isfile(os.path.join(outputs.resolve(args.out), RECORD_FILE))
    args.out = outputs.check_output(args.out, args.overwrite or resume,
                                    {"teacher": args.teacher, "data": args.data, "held-out data": args.heldout,
                                     "general held-out data": args.general},
                                    related=[outputs.staging_path(args.out)])
    training_args = (["--use_cpu", "true"] if args.device == "cpu" else []) + args.training_args
    teacher, tokenizer = arguments.load(args.teacher, args)
    # Everything a schedule can get wrong, before the data is read.
    schedule_plan(teacher, target, chosen["schedule"], chosen["search"], chosen["distill"].max_tokens)
    train = arguments.training_data(args)
    heldout = {name: _data(paths, args) for name, paths in (("heldout", args.heldout), ("general", args.general))
               if paths is not None}
    place = outputs.atomic_output(args.out) if args.overwrite else contextlib.nullcontext(args.out)
    with place as out:
        record = gradual_prune(teacher, tokenizer, train, out, target=target, training_args=training_args,
                               seed=args.seed, save_dtype=args.save_dtype, heldout=heldout,
                               progress=arguments.progress(args), **chosen)
    print("\n".join(gradual_report_lines(record)))
    print(f"final student: {os.path.join(args.out, record['final'])}")
    return EXIT_OK


def _data(paths: list[str], args):
    """Held-out ``paths`` as ``--data`` reads its own: token shards, else texts."""
    from slimlm.data import load_texts

    shards = arguments.token_shards(paths)
    return shards if shards is not None else load_texts(paths, text_field=args.text_field)
