"""A training mix over the corpus's data sources (``distill.corpus_sources``) in constant memory:
the sources cut from token shards of 10⁸ to 10¹¹ tokens (``corpus_sources``: each source's blocks
as ranges) and a ``SourceMixture`` over them with a real run's item count, reading the same
number of items at every size. The blocks are indices (no token is read), so the rows measure
what the mix itself holds: its peak resident memory above the start, and the time per item.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -s benchmarks/bench_mixture.py --benchmark-only
"""
from __future__ import annotations

import pytest

from conftest import QUICK, median_seconds, peak_bytes_above_current, record_row, release_freed_memory
from slimlm.distill.mixture import SourceMixture, corpus_sources

SEQ_LEN, BATCH, READS = 512, 8, 20_000 if QUICK else 100_000
SIZES = (10**8, 10**9, 10**11)
SHARES = {"web": 0.6, "code": 0.25, "books": 0.1, "papers": 0.05}


class Shards:
    """What ``corpus_sources`` reads of ``TokenShards``, for a corpus of ``tokens`` tokens."""

    def __init__(self, tokens: int):
        self.path, self.tokens = f"{tokens} tokens", tokens

    def source_names(self):
        return list(SHARES)

    def source_ranges(self):
        ranges, start = [], 0
        for index, share in enumerate(SHARES.values()):
            stop = self.tokens if index == len(SHARES) - 1 else start + int(self.tokens * share)
            ranges.append((index, start, stop))
            start = stop
        return ranges


def read_mix(tokens: int) -> int:
    blocks = range(tokens // SEQ_LEN)
    sources = corpus_sources(Shards(tokens), blocks, SEQ_LEN)
    weights = {name: 1.0 for name in sources}
    mixture = SourceMixture(sources, weights, batch_size=BATCH, num_items=len(blocks), seed=0)
    # the last READS items: the mix's draws up to there are counted, as a run near its end does
    return sum(mixture[index] for index in range(len(blocks) - READS, len(blocks)))


@pytest.mark.benchmark(group="mixture")
def test_a_mix_of_corpus_sources_holds_constant_memory(benchmark):
    peaks, seconds = {}, {}
    for tokens in SIZES:
        release_freed_memory()
        peaks[tokens] = peak_bytes_above_current(lambda: read_mix(tokens))
        seconds[tokens] = median_seconds(lambda: read_mix(tokens), rounds=1, warmup=0)
        shape = f"{tokens:.0e} tokens, {len(SHARES)} sources, {READS} items read"
        record_row("mixture.corpus_sources", "slimlm", shape, "index", "peak_memory", peaks[tokens], "bytes")
        record_row("mixture.corpus_sources", "slimlm", shape, "index", "time_per_item", seconds[tokens] / READS, "s")
    benchmark.pedantic(lambda: read_mix(SIZES[0]), rounds=1, iterations=1)
    print("\n" + "; ".join(f"{tokens:.0e} tokens: peak {peaks[tokens] / 2**20:.1f} MiB, "
                           f"{seconds[tokens] / READS * 1e6:.1f} µs/item" for tokens in SIZES))
    # 1000 times the corpus: the mix's own memory is its counts at every 1024th batch (2·10⁷ batches
    # at 10¹¹ tokens: ~20k rows of 4 counts), not one entry per block.
    assert peaks[SIZES[-1]] < 64 * 2**20
