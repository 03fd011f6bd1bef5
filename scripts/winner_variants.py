"""Distillation settings compared at the demo's own starting point, for a fixed number of tokens.

A finished ``slimlm demo`` (or ``scripts/demo_variant.py``) folder holds the search's winner
(``search/winner``: the pruned student after its re-rank tokens) and the corrected teacher
(``teacher-corrected``). Each variant distills that winner from that teacher for ``--tokens``
tokens with the demo's distillation (``slimlm.pipeline.distill.distill_stage``: bf16 teacher
and student where native, lr 1e-3 cosine with 5% warmup, 4 × 256 tokens a step, the hidden-state
loss with Minitron's weighting on the winner's layer map) changed by the variant's JSON
overrides of ``DistillOptions`` fields (``{"batch_size": 2}``, ``{"lr": 0.002}``;
``"synthetic": PATH`` with ``"mix"``: the texts of a synthetic JSONL mixed in). Printed and
appended to ``<out>/results.jsonl``: seconds and perplexity on 16 blocks of 256 tokens of the
in-domain and the general held-out split (the run's data folder). ``<out>/<name>`` is replaced
when it is slimlm's own earlier output, never when it is, holds or sits in the demo folder, the
data folder or the synthetic file (exit 2 before anything is loaded or written).

    .venv/bin/python scripts/winner_variants.py --run /tmp/demo7/slimlm-demo --data /tmp/demo7/slimlm-demo.data \\
        --out /tmp/wv --tokens 81920 --name bs2 '{"batch_size": 2}'
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished demo run folder")
    parser.add_argument("--data", required=True, help="its data folder (train/heldout/general.jsonl)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=81920)
    parser.add_argument("--name", required=True)
    parser.add_argument("overrides", nargs="?", default="{}", help="DistillOptions fields (and mix, synthetic) as JSON")
    args = parser.parse_args()

    from slimlm import outputs
    from slimlm.data import tokenize_blocks
    from slimlm.distill.generate import read_jsonl
    from slimlm.distill.options import DistillOptions
    from slimlm.errors import InputError
    from slimlm.evaluate import perplexity
    from slimlm.models import load_model, load_tokenizer
    from slimlm.pipeline import distill

    def texts(path):
        return [record["text"] for record in read_jsonl(path)]

    try:
        overrides = json.loads(args.overrides)
    except json.JSONDecodeError as error:
        parser.error(f"overrides are not JSON ({error}): {args.overrides}")
    if not isinstance(overrides, dict):
        parser.error(f"overrides must be a JSON object, got {args.overrides}")
    teacher_dir, start = os.path.join(args.run, "teacher-corrected"), os.path.join(args.run, "search", "winner")
    data_files = [os.path.join(args.data, f"{split}.jsonl") for split in ("train", "heldout", "general")]
    synthetic = overrides.pop("synthetic", None)
    missing = [path for path in (teacher_dir, start, *data_files, synthetic) if path and not os.path.exists(path)]
    if missing:
        parser.error(f"not found: {', '.join(missing)} (--run must be a finished demo folder, --data its data folder)")
    try:  # the variant's folder (and so the results file beside it) neither is, holds nor sits in an input
        outputs.check_output(os.path.join(args.out, args.name), True, {"demo folder": args.run, "data folder": args.data,
                                                                        "synthetic file": synthetic},
                             what="--out/--name")
    except InputError as error:
        parser.error(str(error))
    teacher = load_model(teacher_dir, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(teacher_dir)
    student = load_model(start, dtype=torch.float32)
    layer_map = distill.pruned_layer_map(start, student, teacher)
    mix = overrides.pop("mix", 0.0)
    values = {"seq_len": 256, "max_tokens": args.tokens, "batch_size": 4, "lr": 1e-3, "hidden_loss_weight": 1.0,
              "hidden_loss_schedule": "minitron", **overrides}
    started = time.perf_counter()
    try:  # a setting no run can use is refused before anything is written
        student, _ = distill.distill_stage(
            teacher, student, tokenizer, texts(data_files[0]), os.path.join(args.out, args.name),
            DistillOptions(**values), synthetic_texts=texts(synthetic) if synthetic else None, mix_fraction=mix,
            seed=0, layer_map=layer_map, overwrite=True, resume=False, clear_stale_checkpoints=True, disable_tqdm=True,
            training_args=["--use_cpu", "true", "--warmup_steps", "0.05", "--logging_steps", "10",
                           "--save_steps", "1000000"])
    except InputError as error:
        parser.error(str(error))
    result = {"name": args.name, "tokens": args.tokens, "overrides": json.loads(args.overrides),
              "seconds": round(time.perf_counter() - started)}
    student.eval()
    for split in ("heldout", "general"):
        blocks = tokenize_blocks(texts(os.path.join(args.data, f"{split}.jsonl")), tokenizer, 256, model=student)
        blocks = blocks.select(range(min(16, len(blocks))))
        result[split] = round(perplexity(student, blocks, batch_size=8, progress=False)["perplexity"], 2)
    print(json.dumps(result), flush=True)
    with open(os.path.join(args.out, "results.jsonl"), "a", encoding="utf-8") as handle:
        handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
