"""``slimlm demo``: prune SmolLM2-135M-Instruct to half, distill it back and write a report,
on a corpus cut from the documentation of the installed packages (the builtin recipes)."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.cli.run import print_summary
from slimlm.errors import InputError


def add_parser(subparsers) -> None:
    sub = arguments.add_command(
        subparsers, "demo", "prune SmolLM2-135M-Instruct to half, distill it back, and write a report",
        ["slimlm demo            # about 30 minutes on 2 CPU cores",
         "slimlm demo --quick    # a few minutes: the smoke test"])
    sub.add_argument("--quick", action="store_true", help="a few-minute version (tiny budgets)")
    sub.add_argument("--out", help="output folder (default ./slimlm-demo or ./slimlm-demo-quick)")
    sub.add_argument("--device", help="cpu, cuda … (default: cuda when available)")
    sub.add_argument("--overwrite", action="store_true", help="start over in an output folder of another run")
    sub.set_defaults(handler=run)


def run(args) -> int:
    from slimlm.models import smollm2_gguf_path
    from slimlm.pipeline import builtin_recipe, run_recipe, validate_recipe
    from slimlm.pipeline.corpus import collect_package_docs, write_corpus

    name = "demo-quick" if args.quick else "demo"
    raw = builtin_recipe(name)
    corpus_settings = raw.pop("corpus")
    out = os.path.abspath(args.out or f"slimlm-{name}")
    try:
        teacher = smollm2_gguf_path()
    except FileNotFoundError as error:
        raise InputError(f"{error}; `make build` installs it") from None
    data_folder = os.path.join(out + ".data")
    paths = {split: os.path.join(data_folder, f"{split}.jsonl") for split in ("train", "heldout")}
    if not all(os.path.isfile(path) for path in paths.values()):
        print(f"[data] collecting the documentation of installed packages into {data_folder}")
        paths = write_corpus(collect_package_docs(progress=arguments.progress(args), **corpus_settings), data_folder)
    raw.update(teacher=teacher, out=out, data={"train": paths["train"], "heldout": paths["heldout"]})
    if args.device is not None:
        raw["device"] = args.device
    recipe = validate_recipe(raw, f"builtin recipe {name}")
    summary = run_recipe(recipe, overwrite=args.overwrite, progress=arguments.progress(args),
                         command=f"slimlm demo{' --quick' if args.quick else ''}")
    print_summary(summary)
    return EXIT_OK
