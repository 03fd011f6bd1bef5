"""How close the top-k log-probs kept while the teacher sampled (a synthetic run's
``synthetic.jsonl.topk/<source>``) are to a live float32 teacher forward on the same tokens:

- KL(P ‖ cached ↑): the full float32 teacher against the cached top-k (the sampler's forward,
  bfloat16 where native, then the 6-bit codec), the tail spread evenly over the other tokens;
- KL(P ‖ live top-k ↑): the same for the live teacher's own exact top-k (what truncating to k costs);
- the share of rows whose top-1 id agrees.

The row after a closing EOS (never a target) is left out.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/synthetic_cache_quality.py RUN [--sequences 32]
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from topk_cache_quality import full_kl  # noqa: E402

from slimlm.distill.topk_cache import load_teacher_topk  # noqa: E402
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--sequences", type=int, default=32)
    args = parser.parse_args()
    teacher = load_model(smollm2_gguf_path(), dtype=torch.float32).eval()
    eos = load_tokenizer(smollm2_gguf_path()).eos_token_id
    for folder in sorted(glob.glob(os.path.join(args.run, "synthetic.jsonl.topk", "*", ""))):
        folder = folder.rstrip(os.sep)
        cache = load_teacher_topk(folder)
        cached_kl, live_kl, agree, rows = 0.0, 0.0, 0, 0
        for index in range(min(args.sequences, cache.num_sequences)):
            item = cache.sequence(index)
            ids = item["input_ids"]
            used = ids.numel() - int(ids[-1] == eos)
            with torch.no_grad():
                full = torch.log_softmax(teacher(ids[None]).logits[0, :used].float(), dim=-1)
            k = item["topk_logprobs"].shape[-1]
            live = full.topk(k, dim=-1)
            cached_kl += float(full_kl(full, item["topk_logprobs"][:used], item["topk_indices"][:used]).sum())
            live_kl += float(full_kl(full, live.values, live.indices).sum())
            agree += int((item["topk_indices"][:used, 0] == live.indices[:, 0]).sum())
            rows += used
        print(f"{os.path.basename(folder)}: {rows} rows of {min(args.sequences, cache.num_sequences)} sequences, "
              f"k {k}: KL(P||cached) {cached_kl / rows:.5f}, KL(P||live top-k) {live_kl / rows:.5f} nats/token, "
              f"top-1 agrees {agree / rows:.1%}")


if __name__ == "__main__":
    main()
