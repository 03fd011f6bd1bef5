"""``slimlm run``: the whole pipeline from one recipe YAML; finished stages are skipped, so a
rerun resumes."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "run", "the whole pipeline from one recipe YAML; finished stages are skipped, so a rerun resumes",
        ["slimlm run examples/recipe.yaml", "slimlm run recipe.yaml --out run2/ --overwrite",
         "slimlm run recipe.yaml --save-dtype float32 --out run-float32/"])
    sub.add_argument("recipe", help="recipe YAML (see examples/recipe.yaml)")
    sub.add_argument("--out", help="output folder (default: the recipe's out)")
    sub.add_argument("--device", help="overrides the recipe's device")
    sub.add_argument("--save-dtype", choices=arguments.SAVE_DTYPES,
                     help="overrides the recipe's save_dtype: the dtype the pruned and distilled checkpoints are "
                          "saved in (auto: the teacher's source dtype)")
    sub.add_argument("--overwrite", action="store_true", help="replace an output folder made by another recipe")
    arguments.add_trust_option(sub)
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm import outputs
    from slimlm.pipeline import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    if args.out is not None:
        recipe["out"] = outputs.resolve(args.out)
    if args.device is not None:
        recipe["device"] = args.device
    if args.save_dtype is not None:
        recipe["save_dtype"] = args.save_dtype
    summary = run_recipe(recipe, overwrite=args.overwrite, progress=arguments.progress(args),
                         command=f"slimlm run {args.recipe}", recipe_path=args.recipe,
                         trust_remote_code=args.trust_remote_code)
    print_summary(summary)
    return EXIT_OK


def print_summary(summary: dict) -> None:
    """What a finished pipeline run prints: the comparison table, the report's files, the time."""
    print()
    print(summary["table"])
    print(f"\nreport: {summary['report']['markdown']}")
    print(f"        {summary['report']['html']}")
    print(f"done in {summary['seconds'] / 60:.1f} min")
