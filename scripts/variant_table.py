"""A markdown table of finished runs (``slimlm run``/``scripts/demo_variant.py`` folders): per run,
the distilled student's perplexity on every held-out split, its ratio to the teacher's, and the
distillation's tokens and seconds (``distilled/slimlm_distill.json``).

    .venv/bin/python scripts/variant_table.py /tmp/var/base /tmp/var/covered ...
"""
from __future__ import annotations

import json
import os
import sys

from slimlm.evaluate import held_out_splits


def row(folder: str) -> tuple[list[str], list[str]]:
    with open(os.path.join(folder, "eval.json"), encoding="utf-8") as handle:
        results = {result["name"]: result for result in json.load(handle)["results"]}
    teacher, student = results["teacher"], results["distilled"]
    splits = ["heldout"] + held_out_splits(list(results.values()))
    record_path = os.path.join(folder, "distilled", "slimlm_distill.json")
    record = json.load(open(record_path, encoding="utf-8")) if os.path.isfile(record_path) else {}

    def ppl(result, split):
        return result["perplexity"] if split == "heldout" else result[f"{split}_perplexity"]

    header = ["run", "params"] + [f"{split} (teacher {ppl(teacher, split):.2f})" for split in splits] + \
        ["tokens", "train s"]
    cells = [os.path.basename(folder.rstrip("/")), f"{student['params'] / 1e6:.1f}M"]
    cells += [f"{ppl(student, split):.2f} ({ppl(student, split) / ppl(teacher, split):.2f}×)" for split in splits]
    cells += [f"{record.get('tokens_seen', 0):,}", f"{record.get('train_seconds') or 0:.0f}"]
    return header, cells


def main(folders: list[str]) -> None:
    if not folders:
        raise SystemExit(__doc__)
    rows = [row(folder) for folder in folders]
    header = rows[0][0]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for _, cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
