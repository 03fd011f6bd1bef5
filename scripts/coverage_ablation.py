"""Issue 26's ablation: what each part of the covered mix adds, at equal distillation tokens, from
a finished demo run (``slimlm demo`` or ``scripts/demo_variant.py``): the same student (the search's
short-distilled winner), the same corrected teacher, the same tokens, and

- ``corpus``: the training text alone (today's mix before issue 26);
- ``live``: + the teacher-written text of the run's synthetic stage, a static mix, the teacher run
  on every block (the texts re-tokenised);
- ``cached``: the same text learnt from the top-k kept while the teacher sampled (no teacher pass);
- ``dynamic``: ``cached`` with the dynamic mix (the demo's settings);
- ``sources``: ``corpus`` with each data source of the corpus a source of its own, weighted by the
  dynamic mix (``distill.corpus_sources``; needs ``--train``, shards that record their sources);
- ``sources-cached``: ``cached`` with the corpus's sources, the dynamic mix over them all;
- ``live-sources``: ``live`` drawn batch by batch from one source at a time (the corpus's
  sources and the prompt sources, static weights), as the cached arms draw: it separates what
  one-source batches cost from what the cached targets cost.

Each arm's student: perplexity on the run's held-out sets (24 blocks of 256 tokens each), tokens/s.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/coverage_ablation.py RUN OUT [--tokens 49152] [--arms corpus live ...]
        [--mix 0.35] [--train SHARDS]

``--train``: the token shards the arms train on (default the run's ``tokens/train``); the
``sources`` arms need shards written from one file per source (e.g. the demo's train split cut by
its records' ``source`` prefix).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from slimlm.demo import builtin_recipe
from slimlm.distill.options import DistillOptions
from slimlm.evaluate import perplexity
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path
from slimlm.pipeline.distill import distill_stage, eval_blocks, pruned_layer_map
from slimlm.pipeline.synthetic import load_synthetic
from slimlm.shards import TokenShards

ARMS = ("corpus", "live", "cached", "dynamic", "sources", "sources-cached", "live-sources")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=49152)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--train", help="token shards to train on (default: the run's tokens/train)")
    parser.add_argument("--mix", type=float, help="the synthetic share of the arms with teacher-written text "
                                                  "(default: the demo recipe's synthetic.mix)")
    args = parser.parse_args()
    recipe = builtin_recipe("demo")
    section = {key: value for key, value in recipe["distill"].items()}
    base = DistillOptions(**section)
    base = dataclasses.replace(base, max_tokens=args.tokens, max_minutes=None, finish_by_minutes=None,
                               fit_to_time=False, eval_steps=None)
    tokenizer = load_tokenizer(smollm2_gguf_path())
    corrected = os.path.join(args.run, "teacher-corrected")
    teacher = load_model(corrected if os.path.isdir(corrected) else smollm2_gguf_path(), dtype=torch.float32)
    sets = {name: TokenShards(os.path.join(args.run, "tokens", name)) for name in ("heldout", "general", "english")
            if os.path.isdir(os.path.join(args.run, "tokens", name))}
    blocks = {name: eval_blocks(shards, tokenizer, 256, 24) for name, shards in sets.items()}
    train = TokenShards(args.train or os.path.join(args.run, "tokens", "train"))
    synthetic = load_synthetic(os.path.join(args.run, "synthetic.jsonl"))
    mix = recipe["synthetic"]["mix"] if args.mix is None else args.mix
    flags = ["--use_cpu", "true"]  # the demo's training arguments, checkpoints only at the end
    for key, value in {**recipe["distill"]["training_args"], "save_steps": 100000}.items():
        flags += [f"--{key}", str(value)]
    results = {}
    for arm in args.arms:
        student = load_model(os.path.join(args.run, "search", "winner"), dtype=torch.float32)
        layer_map = pruned_layer_map(os.path.join(args.run, "search", "winner"), student, teacher)
        # the demo's dynamic mix, updated 4 times over the arm's steps (the demo: every 64 of ~290)
        steps = max(1, args.tokens // (base.batch_size * base.seq_len))
        options = dataclasses.replace(base, dynamic_mix=arm in ("dynamic", "sources", "sources-cached"),
                                      corpus_sources="sources" in arm, mix_every=max(1, steps // 4))
        data = {"corpus": dict(mix_fraction=0.0),
                "live": dict(synthetic_texts=synthetic.texts_by_source(), mix_fraction=mix),
                "cached": dict(synthetic_caches=synthetic.caches, mix_fraction=mix),
                "dynamic": dict(synthetic_caches=synthetic.caches, mix_fraction=mix),
                "sources": dict(mix_fraction=0.0),
                "sources-cached": dict(synthetic_caches=synthetic.caches, mix_fraction=mix),
                "live-sources": dict(synthetic_texts=synthetic.texts_by_source(), mix_fraction=mix)}[arm]
        model, history = distill_stage(teacher, student, tokenizer, train, os.path.join(args.out, arm), options,
                                       seed=0, layer_map=layer_map, overwrite=True, resume=False,
                                       disable_tqdm=True, training_args=flags, **data)
        model.eval()
        train_s = next((entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry), None)
        results[arm] = {name: perplexity(model, split, progress=False)["perplexity"] for name, split in blocks.items()}
        results[arm]["train_s"] = train_s
        with open(os.path.join(args.out, arm, "slimlm_distill.json"), encoding="utf-8") as handle:
            data_mix = json.load(handle).get("data_mix")
        if data_mix:  # the weights the last batches were drawn with
            results[arm]["mix"] = {name: round(weight, 3) for name, weight in data_mix[-1]["weights"].items()}
        print(arm, json.dumps(results[arm]), flush=True)
    teacher.eval()
    results["teacher"] = {name: perplexity(teacher, split, progress=False)["perplexity"]
                          for name, split in blocks.items()}
    print("teacher", json.dumps(results["teacher"]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ablation.json"), "w", encoding="utf-8") as handle:
        json.dump({"tokens": args.tokens, "mix": mix, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
