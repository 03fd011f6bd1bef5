"""The order blocks are read in, in O(1) memory: a seeded Feistel ``Permutation`` of [0, n),
``BlockSampler`` (epochs, disjoint ranks, resumable state) and ``BlockStream`` (training items
in sampler order, an IterableDataset)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

if TYPE_CHECKING:
    from slimlm.shards.reader import ShardBlocks

_ROUNDS = 6
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def _mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of 64-bit words."""
    values = (values ^ (values >> np.uint64(30))) * _MIX[0]
    values = (values ^ (values >> np.uint64(27))) * _MIX[1]
    return values ^ (values >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), evaluated per position in O(1) memory: a 6-round balanced
    Feistel network on the smallest even bit width 2h with 4**h ≥ n (keys from ``seed`` and
    ``epoch``), cycle-walked back into [0, n) (fewer than 4 steps on average)."""

    def __init__(self, n: int, seed: int = 0, epoch: int = 0):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = n
        self.half = max(1, ((n - 1).bit_length() + 1) // 2) if n > 1 else 1
        self.mask = np.uint64((1 << self.half) - 1)
        entropy = [seed % (1 << 64), epoch % (1 << 64)]
        self.keys = np.random.SeedSequence(entropy).generate_state(_ROUNDS, dtype=np.uint64)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = values >> half, values & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, positions) -> np.ndarray:
        """π(positions) as int64; each position must lie in [0, n)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.n):
            raise IndexError(f"positions outside [0, {self.n})")
        values = self._encrypt(positions.astype(np.uint64))
        outside = np.flatnonzero(values >= np.uint64(self.n))
        while outside.size:
            values[outside] = self._encrypt(values[outside])
            outside = outside[values[outside] >= np.uint64(self.n)]
        return values.astype(np.int64)


class BlockSampler(torch.utils.data.Sampler):
    """Block indices of [0, num_blocks) for one rank of ``world_size``, epoch after epoch. Epoch e
    visits the blocks in the order π_e(0), π_e(1), … (``Permutation(num_blocks, seed, e)``; the
    identity without ``shuffle``); rank r takes positions r, r + world_size, r + 2·world_size, …
    so the ranks' blocks are disjoint and together every block once per epoch (ranks differ by
    at most one block; ``drop_last`` cuts every rank to num_blocks // world_size, leaving out
    the last num_blocks mod world_size positions of the epoch). Memory is O(1) in num_blocks.

    Iterating yields the rest of the current epoch and moves to the next; ``state_dict`` after k
    indices have been taken, loaded into a new sampler, continues at index k + 1 (a DataLoader
    with workers takes indices ahead of the batches it has delivered: save ``epoch`` and the
    count of samples consumed instead)."""

    _CHUNK = 8192

    def __init__(self, num_blocks: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if drop_last and num_blocks < world_size:
            raise ValueError(f"drop_last with {num_blocks} blocks for {world_size} ranks leaves every rank none")
        self.num_blocks, self.seed, self.shuffle = num_blocks, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = self.index = 0

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_blocks // self.world_size
        return -(-(self.num_blocks - self.rank) // self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (as torch's DistributedSampler)."""
        self.epoch, self.index = epoch, 0

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """This rank's block indices at its positions [start, stop) of ``epoch``."""
        positions = self.rank + self.world_size * np.arange(start, min(stop, len(self)), dtype=np.int64)
        return Permutation(self.num_blocks, self.seed, epoch)(positions) if self.shuffle else positions

    def __iter__(self) -> Iterator[int]:
        if self.index >= len(self):
            self.set_epoch(self.epoch + 1)
        while self.index < len(self):
            for value in self.indices(self.epoch, self.index, self.index + self._CHUNK).tolist():
                self.index += 1
                yield value
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "seed": self.seed, "shuffle": self.shuffle, "rank": self.rank,
                "world_size": self.world_size, "drop_last": self.drop_last, "epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        """Continue where the sampler that saved ``state`` stopped; ValueError for the state of
        another sampler (other blocks, seed, order or ranks)."""
        for key in ("num_blocks", "seed", "shuffle", "rank", "world_size", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state of {key}={state.get(key)!r} cannot continue a sampler of "
                                 f"{key}={getattr(self, key)!r}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class BlockStream(torch.utils.data.IterableDataset):
    """Training items of ``blocks`` in ``sampler`` order, for a DataLoader or the HF Trainer. In a
    DataLoader with workers, worker w of W yields the items w, w + W, … of the order.

    Under the HF Trainer (accelerate) on several processes, the Trainer itself splits an
    iterable dataset's batches among ranks: give it the stream of rank 0 of 1."""

    def __init__(self, blocks: ShardBlocks, sampler: BlockSampler):
        if sampler.num_blocks != len(blocks):
            raise ValueError(f"the sampler draws from {sampler.num_blocks} blocks, the shards have {len(blocks)}")
        self.blocks, self.sampler = blocks, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        for count, index in enumerate(self.sampler):
            if worker is None or count % worker.num_workers == worker.id:
                yield self.blocks[index]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
