"""Does generation through vLLM (``engine: vllm``) write what the slimlm sampler writes?

    PYTHONPATH=src VENV/bin/python scripts/vllm_generate_check.py --model DIR [--prompts 32]
        [--max-new-tokens 64] [--keep-topk 16] [--dtype bfloat16] [--server] [--json OUT]

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

With ``--server`` it also starts vLLM's OpenAI-compatible server (``vllm_teacher_check.start_server``)
and samples through ``VLLMServerSampler``: same seeds, so it should draw what the in-process vLLM
drew (the records compared), into the same format (its cache's fidelity printed the same way).

The slimlm sampler and vLLM draw different samples for one seed, so their texts are not compared
token by token. Exits 1 when vLLM's cached targets agree less with the float32 teacher than the slimlm
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
    parser.add_argument("--server", action="store_true", help="also sample through vLLM's OpenAI-compatible server")
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
        engines = [("vllm", sampler), ("slimlm", "slimlm")]
        process = None
        if args.server:
            import argparse as _argparse

            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from vllm_teacher_check import start_server

            from slimlm.distill.vllm_sampler import VLLMServerSampler

            started = time.perf_counter()
            process, url = start_server(_argparse.Namespace(model=args.model, dtype=args.dtype, seq_len=2047,
                                                            k=[args.keep_topk]), os.path.join(work, "server.log"))
            figures["server_start_s"] = time.perf_counter() - started
            engines.append(("vllm-server", VLLMServerSampler(url, args.model,
                                                              vocab_size=teacher.get_output_embeddings().weight.shape[0])))
        records = {}
        for name, engine in engines:
            started = time.perf_counter()
            data = generate_synthetic(teacher, tokenizer, prompts, out_path=os.path.join(work, f"{name}.jsonl"),
                                      engine=engine, cache_dir=os.path.join(work, f"{name}.topk"), **common)
            seconds = time.perf_counter() - started
            new = sum(record["num_new_tokens"] for record in data.records)
            records[name] = [record["ids"] for record in data.records]
            figures[name] = {"seconds": seconds, "kept_new_tokens": new, "counts": data.counts,
                             **fidelity(teacher, data.caches)}
            print(f"{name}: {len(data)} records, {new} kept new tokens in {seconds:.1f} s "
                  f"(counts {data.counts}); cached targets against float32: top-1 "
                  f"{figures[name]['top1_agrees']:.1%}, mean |Δ log p| {figures[name]['mean_abs_delta']:.4f} "
                  f"over {figures[name]['rows']} rows", flush=True)
        if process is not None:
            process.terminate()
            process.wait(60)
            same = sum(a == b for a, b in zip(records["vllm"], records["vllm-server"]))
            figures["server_records_equal"] = same
            print(f"vllm-server: {same} of {len(records['vllm'])} records identical to the in-process vLLM's "
                  f"(server start-up {figures['server_start_s']:.1f} s)")
    print(f"vLLM start-up {figures['vllm_start_s']:.1f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=1)
    return 1 if figures["vllm"]["top1_agrees"] < figures["slimlm"]["top1_agrees"] - 0.02 else 0


if __name__ == "__main__":
    sys.exit(main())
