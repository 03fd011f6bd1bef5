"""Distillation from token shards (``distill_stage`` over ``ShardBlocks``, ``SeededOrder``'s
``BlockSampler``): two ranks read every block once per epoch, in the seeded order the batches of
which accelerate deals out in turn; a run killed after a checkpoint resumes at the same block,
with the same losses, bit for bit — on one process and on two.

The corpus: 21 documents, 186 tokens (20 × 9 + 6, EOS included). With ``pad_last`` that is 24
blocks of 8 tokens (the last 2 tokens and 6 of padding) or 27 of 7 (the last 4 and 3)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from slimlm.shards import Permutation, write_shards
from shard_worker import BATCH, SAVE_STEPS, distill_run, record
from test_trainer import launcher_env
from tiny import WORDS, word_tokenizer

WORLD = 2
TEXTS = [" ".join(WORDS[(5 * doc + word) % len(WORDS)] for word in range(8)) for doc in range(20)] + \
    ["the model is small ."]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS))
    written = write_shards(str(folder / "corpus.jsonl"), word_tokenizer(), folder / "shards", log=lambda *_: None)
    assert written.num_tokens == 186
    return written


def epoch_order(n: int, epoch: int, seed: int = 0) -> list[int]:
    """The order ``BlockSampler(n, seed=seed)`` visits [0, n) in epoch ``epoch``."""
    return Permutation(n, seed, epoch)(np.arange(n)).tolist()


def dealt(order: list[int], rank: int) -> list[int]:
    """Rank ``rank``'s items of an epoch in ``order`` (a multiple of WORLD · BATCH items): accelerate
    cuts it into batches of BATCH and deals them out in turn, batch b to rank b mod WORLD."""
    batches = [order[start:start + BATCH] for start in range(0, len(order), BATCH)]
    return [index for batch in batches[rank::WORLD] for index in batch]


def per_epoch(reads: list[int], epochs: int) -> list[list[int]]:
    size = len(reads) // epochs
    assert size * epochs == len(reads)
    return [reads[epoch * size:(epoch + 1) * size] for epoch in range(epochs)]


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory):
    """Runs of ``shard_worker.py`` on 2 processes (torchrun, gloo), by name: [rank 0's, rank 1's]
    records. even: 24 blocks, 2 epochs; uneven: 27 blocks, 1 epoch; mixed: 24 blocks with
    synthetic items to a quarter of 32, 1 epoch; killed: even's run, killed after the checkpoint
    of step 8 (epoch 1, 2 steps in) and resumed."""
    out = tmp_path_factory.mktemp("two_ranks")
    worker = os.path.join(os.path.dirname(__file__), "shard_worker.py")
    runs = ["even:8:2:0:0", "uneven:7:1:0:0", "mixed:8:1:0.25:0", "killed:8:2:0:8"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
                    worker, str(shards.path), str(out), *runs], check=True, env=launcher_env(), timeout=600)
    records = {run.split(":")[0]: [json.loads((out / f"{run.split(':')[0]}-rank{rank}.json").read_text())
                                   for rank in range(WORLD)] for run in runs}
    assert all(record["world_size"] == WORLD for ranks in records.values() for record in ranks)
    return records


def test_two_ranks_read_every_block_once_per_epoch(two_ranks):
    """24 blocks, 2 per batch, 2 ranks: 6 steps an epoch, each rank 12 blocks, none in common; both
    together every block once per epoch, in the epoch's own seeded order."""
    ranks = [per_epoch(record["items"], 2) for record in two_ranks["even"]]
    for epoch in range(2):
        order = epoch_order(24, epoch)
        assert [ranks[rank][epoch] for rank in range(WORLD)] == [dealt(order, rank) for rank in range(WORLD)]
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == list(range(24))
    assert epoch_order(24, 0) != epoch_order(24, 1)


def test_an_uneven_last_round_is_filled_from_the_epoch_start(two_ranks):
    """27 blocks (the last padded by ``pad_last``) make 13 batches of 2 and one of 1: accelerate
    (``even_batches``, ``dataloader_drop_last`` False) gives each rank 7 full batches, completing
    the short last batch with the epoch's first block. So every block is read, and one twice:
    the first of the epoch's order (WORLD · BATCH · 7 − 27 = 1 block of padding)."""
    order = epoch_order(27, 0)
    rank0, rank1 = (record["items"] for record in two_ranks["uneven"])
    assert rank0 == dealt(order + order[:1], 0) and rank1 == dealt(order + order[:1], 1)
    assert sorted(rank0 + rank1) == sorted(list(range(27)) + order[:1])


def test_a_synthetic_mix_reads_every_item_and_every_block_once(two_ranks):
    """24 blocks joined by 8 synthetic items (``MixedItems``, 32): one epoch reads every item of
    the mix once and, through it, every block once."""
    records = two_ranks["mixed"]
    assert [record["items"] for record in records] == [dealt(epoch_order(32, 0), rank) for rank in range(WORLD)]
    assert sorted(records[0]["blocks"] + records[1]["blocks"]) == list(range(24))


def test_two_ranks_resume_at_the_same_block_with_the_same_losses(two_ranks):
    """Killed after the checkpoint of step 8 (epoch 1, 2 steps in) and resumed, each rank reads
    the blocks and trains the losses of the run that went through."""
    done = 8 * BATCH
    for straight, killed in zip(two_ranks["even"], two_ranks["killed"]):
        assert killed["losses"] == straight["losses"][:8]
        assert killed["items"][:done] == straight["items"][:done]
        assert killed["resumed"]["items"] == straight["items"][done:]
        assert killed["resumed"]["losses"] == straight["losses"][8:]


@pytest.mark.parametrize("mix, items, kill", [(0.0, 24, 16), (0.25, 32, 20)])
def test_a_killed_distillation_resumes_at_the_same_block_with_the_same_losses(shards, tmp_path, monkeypatch, mix,
                                                                              items, kill):
    """One process, 2 epochs, a checkpoint every SAVE_STEPS steps: a run killed after the checkpoint
    of step ``kill`` (in epoch 1) and resumed reads the blocks of the run that went through, in
    the same order, and trains the same losses, ``==`` on floats."""
    assert kill % SAVE_STEPS == 0 and items // BATCH < kill < 2 * items // BATCH
    log = {}
    record(log, monkeypatch.setattr)
    straight = distill_run(shards, str(tmp_path / "straight"), log, seq_len=8, epochs=2, mix=mix)["run"]
    assert per_epoch(straight["items"], 2) == [epoch_order(items, 0), epoch_order(items, 1)]
    killed = distill_run(shards, str(tmp_path / "killed"), log, seq_len=8, epochs=2, mix=mix, kill=kill)
    done = kill * BATCH
    assert killed["run"]["losses"] == straight["losses"][:kill]
    assert killed["run"]["items"][:done] == straight["items"][:done]
    assert killed["resumed"]["items"] == straight["items"][done:]
    assert killed["resumed"]["losses"] == straight["losses"][kill:]
    assert len(straight["losses"]) == 2 * items // BATCH
