"""One variant of the demo: ``slimlm run`` on the builtin ``demo.yaml`` with ``section.field=value``
(or ``section={...}``) overrides, YAML-parsed, on a demo data folder (collected with the recipe's
corpus settings when it holds no ``train/heldout/general/english.jsonl`` yet; ``slimlm demo`` leaves one
at ``slimlm-demo.data``). Runs resume like any ``slimlm run`` folder.

    .venv/bin/python scripts/demo_variant.py /tmp/var/base /tmp/var/data
    .venv/bin/python scripts/demo_variant.py /tmp/var/recon /tmp/var/data 'reconstruct={num_samples: 32, ridge: 1.0}'
"""
from __future__ import annotations

import os
import sys

import yaml

from slimlm.cli.demo import CORPUS_SPLITS
from slimlm.cli.run import print_summary
from slimlm.models import smollm2_gguf_path
from slimlm.demo import builtin_recipe, collect_corpus, write_corpus
from slimlm.pipeline import run_recipe, validate_recipe


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, data = os.path.abspath(argv[0]), os.path.abspath(argv[1])
    raw = builtin_recipe("demo")
    corpus = raw.pop("corpus")
    paths = {split: os.path.join(data, f"{split}.jsonl") for split in CORPUS_SPLITS}
    if not all(os.path.isfile(path) for path in paths.values()):
        paths = write_corpus(collect_corpus(progress=False, **corpus), data)
    general = {split: path for split, path in paths.items() if split not in ("train", "heldout")}
    raw.update(teacher=smollm2_gguf_path(), out=out,
               data={"train": paths["train"], "heldout": paths["heldout"], "general": general})
    for item in argv[2:]:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        if field:
            raw.setdefault(section, {})[field] = yaml.safe_load(value)
        else:
            raw[section] = yaml.safe_load(value)
    recipe = validate_recipe(raw, "demo variant")
    print_summary(run_recipe(recipe, overwrite=False, progress=False, command="demo variant " + " ".join(argv[2:])))


if __name__ == "__main__":
    main(sys.argv[1:])
