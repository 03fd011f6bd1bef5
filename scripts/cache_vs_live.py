"""The offline teacher against the live one, at equal tokens (issue 25): SmolLM2-135M-Instruct
pruned to half by width, distilled on the same token shards (a) from the live teacher (full-
vocabulary KL, its forward in every step) and (b) from its compressed top-k cache (``slimlm
teacher-cache``: k = ``--k``, 6-bit probability codes, no teacher loaded while training) and
(c) from the same top-k stored near-exactly (16-bit codes: the live top-k's targets, so (b)
against (c) is the compression's cost and (a) against (c) the top-k cut's). Printed and written to
``<out>/results.json``: the cache's size and build time, each arm's training tokens/s and
held-out perplexity on ``--heldout-blocks`` blocks of the in-domain and the general split.

    .venv/bin/python scripts/cache_vs_live.py --out /tmp/cache-vs-live
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from slimlm import estimate_importance, load_model, load_tokenizer, prune, smollm2_gguf_path
from slimlm.demo.corpus import collect_package_docs, write_corpus
from slimlm.distill.options import DistillOptions, TeacherCacheOptions
from slimlm.evaluate import perplexity
from slimlm.pipeline.distill import distill_stage, eval_blocks
from slimlm.pipeline.teacher_cache import teacher_cache_stage
from slimlm.shards import write_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=49152, help="training tokens per arm")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--heldout-blocks", type=int, default=16)
    parser.add_argument("--arms", default="live,cache,exact", help="which arms to run, in this order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    gguf = smollm2_gguf_path()
    teacher, tokenizer = load_model(gguf, dtype=torch.float32), load_tokenizer(gguf)
    corpus = collect_package_docs(train_chars=1_000_000, heldout_chars=100_000, progress=False)
    paths = write_corpus(corpus, os.path.join(args.out, "corpus"))
    quiet = lambda line: None  # noqa: E731
    train = write_shards(paths["train"], tokenizer, os.path.join(args.out, "train-shards"), overwrite=True, log=quiet)
    heldout = write_shards(paths["heldout"], tokenizer, os.path.join(args.out, "heldout-shards"), overwrite=True,
                           log=quiet)
    calibration = train.sample_blocks(32, args.seq_len, seed=0)
    scores = estimate_importance(teacher, calibration, depth=("block_influence",), progress=False)
    # One pruned student per arm, made before any training (the distillation freezes the teacher).
    arms = args.arms.split(",")
    students = {arm: prune(teacher, scores, {"target_params": 0.5}, inplace=False) for arm in arms}
    blocks = eval_blocks(heldout, tokenizer, args.seq_len, args.heldout_blocks)
    results = {"tokens": args.tokens, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
               "k": args.k, "threads": torch.get_num_threads(),
               "teacher_ppl": perplexity(teacher, blocks, progress=False)["perplexity"]}

    num_blocks = -(-args.tokens // args.seq_len)
    caches = {}
    for arm, bits in (("cache", 6), ("exact", 16)):
        if arm not in arms:
            continue
        started = time.perf_counter()
        caches[arm] = teacher_cache_stage(teacher, tokenizer, train, os.path.join(args.out, f"{arm}-cache"),
                                          TeacherCacheOptions(k=args.k, prob_bits=bits), seq_len=args.seq_len,
                                          num_blocks=num_blocks, log=quiet)
        records = sum(entry.stat().st_size for entry in os.scandir(caches[arm]) if entry.name.endswith(".topk"))
        results[f"{arm}_build_seconds"] = time.perf_counter() - started
        results[f"{arm}_bytes_per_token"] = records / (num_blocks * args.seq_len)

    # Precisions auto: the live teacher at its fastest (bfloat16 where native), the student in bf16 mixed.
    options = DistillOptions(seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, max_tokens=args.tokens)
    flags = ["--save_strategy", "no", "--report_to", "none", "--logging_steps", "8"]
    for arm in arms:
        source, cached = (teacher, None) if arm == "live" else (None, caches[arm])
        model = students[arm].requires_grad_(True).train()
        trained, history = distill_stage(source, model, tokenizer, train, os.path.join(args.out, arm), options,
                                         teacher_cache=cached, training_args=flags, overwrite=True, resume=False,
                                         clear_stale_checkpoints=True, disable_tqdm=True, log=quiet)
        seconds = next(entry["train_runtime"] for entry in reversed(history) if "train_runtime" in entry)
        results[arm] = {"train_seconds": seconds, "tokens_per_second": args.tokens / seconds,
                        "heldout_ppl": perplexity(trained.eval(), blocks, progress=False)["perplexity"]}
        print(f"{arm}: {results[arm]['tokens_per_second']:.0f} tokens/s, held-out perplexity "
              f"{results[arm]['heldout_ppl']:.2f}", flush=True)
    for arm in arms:
        for other in arms:
            if arm != other:
                results[f"{arm}_vs_{other}"] = {
                    "speed": results[arm]["tokens_per_second"] / results[other]["tokens_per_second"],
                    "ppl": results[arm]["heldout_ppl"] / results[other]["heldout_ppl"]}
    print(json.dumps(results, indent=2))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
