"""Does generation through vLLM (``engine: vllm``) write what the slimlm sampler writes?

    PYTHONPATH=src VENV/bin/python scripts/vllm_generate_check.py --model DIR [--prompts 32]
        [--max-new-tokens 64] [--keep-topk 16] [--dtype bfloat16] [--json OUT]

Run with the python of a virtualenv that has vLLM (``scripts/vllm_check.sh`` installs one) and
slimlm's sources on PYTHONPATH. For the built-in general prompts as chat turns, it samples once
through ``VLLMSampler`` (started and warmed first, so its start-up is timed apart) and once
through the slimlm sampler, each into a synthetic file with its top-k caches, and prints:

- the new tokens each engine's kept samples hold (after the filters) per second, and vLLM's
  start-up seconds (run it with OMP_NUM_THREADS=1: both engines then use one core);
- the fidelity of each engine's cached targets against a float32 in-process teacher on the same
  tokens: top-1 agreement and the mean |Δ log p| of the cached ids (the row after each
  sequence's last token left out: it is never a target);
- the filter counts of both.

The two engines draw different samples for one seed, so their texts are not compared token by
token. Exits 1 when vLLM's cached targets agree less with the float32 teacher than the slimlm
sampler's do (top-1 agreement more than 2 points lower).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch  # noqa: E402

from slimlm.distill.generate import generate_synthetic  # noqa: E402
from slimlm.distill.prompts import general_prompts  # noqa: E402
from slimlm.distill.topk_cache import load_teacher_topk  # noqa: E402
from slimlm.distill.vllm_sampler import VLLMSampler  # noqa: E402
from slimlm.models import load_model, load_tokenizer  # noqa: E402


def fidelity(teacher, caches: dict) -> dict:
    agree = rows = 0
    delta = 0.0
    for path in caches.values():
        cache = load_teacher_topk(path)
        for number in range(cache.num_sequences):
            stored = cache.sequence(number)
            ids = stored["input_ids"]
            with torch.no_grad():
                live = torch.log_softmax(teacher(ids[None]).logits[0].float(), -1)[:-1]
            cached, indices = stored["topk_logprobs"][:-1], stored["topk_indices"][:-1]
            agree += int((indices[:, 0] == live.argmax(-1)).sum())
            delta += float((cached - live.gather(1, indices)).abs().mean(1).sum())
            rows += live.shape[0]
    return {"rows": rows, "top1_agrees": agree / rows, "mean_abs_delta": delta / rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--keep-topk", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    tokenizer = load_tokenizer(args.model)
    teacher = load_model(args.model, dtype=torch.float32).eval()
    prompts = [("general", prompt) for prompt in general_prompts(args.prompts, seed=0)]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, batch_size=args.batch_size,
                  seed=0, chat_template=True, keep_topk=args.keep_topk, dtype=dtype, progress=False)
    figures = {"model": args.model, "dtype": args.dtype, "prompts": args.prompts,
               "max_new_tokens": args.max_new_tokens, "keep_topk": args.keep_topk}
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        sampler = VLLMSampler(args.model, dtype=dtype, enforce_eager=True, max_model_len=2048)
        list(sampler.sample([[1, 2, 3]], max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0, eos_token_id=None,
                            keep_topk=args.keep_topk))
        figures["vllm_start_s"] = time.perf_counter() - started
        for name, engine in (("vllm", sampler), ("slimlm", "slimlm")):
            started = time.perf_counter()
            data = generate_synthetic(teacher, tokenizer, prompts, out_path=os.path.join(work, f"{name}.jsonl"),
                                      engine=engine, cache_dir=os.path.join(work, f"{name}.topk"), **common)
            seconds = time.perf_counter() - started
            new = sum(record["num_new_tokens"] for record in data.records)
            figures[name] = {"seconds": seconds, "kept_new_tokens": new, "counts": data.counts,
                             **fidelity(teacher, data.caches)}
            print(f"{name}: {len(data)} records, {new} kept new tokens in {seconds:.1f} s "
                  f"(counts {data.counts}); cached targets against float32: top-1 "
                  f"{figures[name]['top1_agrees']:.1%}, mean |Δ log p| {figures[name]['mean_abs_delta']:.4f} "
                  f"over {figures[name]['rows']} rows", flush=True)
    print(f"vLLM start-up {figures['vllm_start_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 1 if figures["vllm"]["top1_agrees"] < figures["slimlm"]["top1_agrees"] - 0.02 else 0


if __name__ == "__main__":
    sys.exit(main())
