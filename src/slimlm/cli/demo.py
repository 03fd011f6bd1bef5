"""``slimlm demo``: prune SmolLM2-135M-Instruct to half, distill it back and write a report,
on a corpus cut from text every machine has (the builtin recipes; ``slimlm.demo``):
train and in-domain held-out splits from the installed packages' docs, the standard library,
READMEs, man and info pages, and a general held-out split from the Python Language Reference and
licence texts that training never reads."""
from __future__ import annotations

import os

from slimlm.cli import arguments
from slimlm.cli.arguments import EXIT_OK
from slimlm.cli.run import print_summary
from slimlm.errors import InputError


# The corpus's splits (slimlm.demo.corpus): training, in-domain held-out, and the general held-out sets.
CORPUS_SPLITS = ("train", "heldout", "general", "english")


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
    from slimlm import outputs
    from slimlm.models import smollm2_gguf_path
    from slimlm.demo import builtin_recipe, collect_corpus, write_corpus
    from slimlm.pipeline import run_recipe, validate_recipe

    name = "demo-quick" if args.quick else "demo"
    raw = builtin_recipe(name)
    corpus_settings = raw.pop("corpus")
    try:
        teacher = smollm2_gguf_path()
    except FileNotFoundError as error:
        raise InputError(f"{error}; `make build` installs it") from None
    # Both outputs are checked (and locked) before the corpus is collected; the run folder's
    # recipe check follows in the run itself.
    out = outputs.check_output(args.out or f"slimlm-{name}", True, {"teacher": teacher}, what="output folder")
    data_folder = out + ".data"
    paths = {split: os.path.join(data_folder, f"{split}.jsonl") for split in CORPUS_SPLITS}
    # english.jsonl is written only where its books are installed (the demo extra): not required.
    if not all(os.path.isfile(paths[split]) for split in CORPUS_SPLITS if split != "english"):
        outputs.check_output(data_folder, True, {"teacher": teacher}, what="demo data folder")
        print(f"[data] collecting text every machine has into {data_folder}")
        try:
            corpus = collect_corpus(progress=arguments.progress(args), **corpus_settings)
        except ValueError as error:
            raise InputError(f"cannot build the demo's corpus: {error}") from None
        for source, entry in corpus["manifest"]["sources"].items():
            if "skipped" in entry:
                print(f"[data]   {source:<17} skipped: {entry['skipped']}")
            else:
                print(f"[data]   {source:<17} " + ", ".join(f"{split} {chars:,}" for split, chars in entry["chars"].items())
                      + " chars")
        with outputs.atomic_output(data_folder) as staging:
            written = write_corpus(corpus, staging)
        paths = {split: os.path.join(data_folder, os.path.basename(path)) for split, path in written.items()}
    # The held-out sets of other registers than the training text, each evaluated and reported on its own.
    general = {split: path for split, path in paths.items()
               if split not in ("train", "heldout") and os.path.isfile(path)}
    raw.update(teacher=teacher, out=out, data={"train": paths["train"], "heldout": paths["heldout"], "general": general})
    if args.device is not None:
        raw["device"] = args.device
    recipe = validate_recipe(raw, f"builtin recipe {name}")
    summary = run_recipe(recipe, overwrite=args.overwrite, progress=arguments.progress(args),
                         command=f"slimlm demo{' --quick' if args.quick else ''}")
    print_summary(summary)
    return EXIT_OK
