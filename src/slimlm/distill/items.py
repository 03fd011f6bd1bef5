"""What a distillation trains on, and in what order: Trainer items from token blocks (the blocks
of token shards, read lazily, or of texts), classic text with synthetic text mixed in (lazily for
a dataset of any size), and the seeded constant-memory order a run and its resume share
(``SeededOrder``)."""
from __future__ import annotations

import numpy as np
import torch


def training_items(blocks) -> list[dict]:
    """Trainer items from TokenBlocks: labels = input_ids with -100 on padding."""
    return [{"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
            for ids, mask in zip(blocks.input_ids, blocks.attention_mask)]


def training_set(classic, synthetic: list | None, mix_fraction: float, *, seed: int = 0, num_items: int | None = None):
    """The training items of ``classic`` joined by ``synthetic`` ones, shuffled with ``seed``.

    With ``num_items`` (what the run reads: max_steps × batch): exactly ``round(num_items ·
    mix_fraction)`` of those items are synthetic, in a seeded order mixed item by item
    (``ExactMix``; each source repeats only once it has served every item). Without it (a run
    over whole epochs): all ``classic`` items joined by synthetic ones up to ``mix_fraction`` of
    the total (fewer when there are not enough of them; none is repeated). ``mix_fraction`` 1:
    the synthetic items alone; 0 or ``synthetic`` None: ``classic`` as it is. ``classic`` is a
    list, or a map-style dataset (the blocks of token shards) mixed lazily (constant memory
    whatever its size)."""
    from slimlm.distill.generate import mix

    if synthetic is None or mix_fraction <= 0:
        return classic
    if num_items is not None:
        return ExactMix(classic, synthetic, num_items=num_items, num_synthetic=round(num_items * mix_fraction),
                        seed=seed)
    wanted = len(classic) * mix_fraction / (1.0 - mix_fraction) if mix_fraction < 1 else len(synthetic)
    num_synthetic = min(len(synthetic), round(wanted))
    total = len(classic) + num_synthetic if mix_fraction < 1 else num_synthetic
    if isinstance(classic, list):
        return mix(classic, synthetic, synthetic_fraction=num_synthetic / total, num_samples=total, seed=seed)
    return MixedItems(classic if mix_fraction < 1 else [], synthetic[:num_synthetic], seed=seed)


class ExactMix(torch.utils.data.Dataset):
    """``num_items`` items of which ``num_synthetic`` come from ``synthetic`` and the rest from
    ``classic``, in one seeded order computed per index: slot i holds the item that a
    ``slimlm.shards.Permutation`` of the slots sends to rank r; ranks below ``num_synthetic``
    walk ``synthetic``, the others ``classic``, each in its own seeded permutation, pass after
    pass (an item repeats only once its source has served them all). Constant memory."""

    def __init__(self, classic, synthetic, *, num_items: int, num_synthetic: int, seed: int = 0):
        from slimlm.shards import Permutation

        if not 0 <= num_synthetic <= num_items:
            raise ValueError(f"num_synthetic must be in [0, num_items={num_items}], got {num_synthetic}")
        if num_synthetic and not len(synthetic) or num_synthetic < num_items and not len(classic):
            raise ValueError("a source the mix draws from is empty")
        self.classic, self.synthetic = classic, synthetic
        self.num_items, self.num_synthetic, self.seed = num_items, num_synthetic, seed
        self.order = Permutation(num_items, seed)
        self._seeds = {name: int(np.random.SeedSequence([seed % (1 << 64), tag]).generate_state(1, np.uint64)[0])
                       for tag, name in enumerate(("synthetic", "classic"), start=1)}
        self._walks = {}  # the permutation of each source's current pass

    def __len__(self) -> int:
        return self.num_items

    def _walk(self, source, name: str, rank: int):
        from slimlm.shards import Permutation

        walk_pass, step = divmod(rank, len(source))
        if self._walks.get(name, (None,))[0] != walk_pass:
            self._walks[name] = (walk_pass, Permutation(len(source), self._seeds[name], walk_pass))
        return source[int(self._walks[name][1]([step])[0])]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        rank = int(self.order([index])[0])
        if rank < self.num_synthetic:
            return self._walk(self.synthetic, "synthetic", rank)
        return self._walk(self.classic, "classic", rank - self.num_synthetic)


class MixedItems(torch.utils.data.Dataset):
    """``classic`` and ``synthetic`` items (map-style) in one seeded order computed per index
    (``slimlm.shards.Permutation``), so the mix of a corpus of any size takes no memory."""

    def __init__(self, classic, synthetic: list, *, seed: int = 0):
        from slimlm.shards import Permutation

        self.classic, self.synthetic = classic, synthetic
        self.order = Permutation(len(classic) + len(synthetic), seed)

    def __len__(self) -> int:
        return len(self.classic) + len(self.synthetic)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        position = int(self.order([index])[0])
        return self.classic[position] if position < len(self.classic) else self.synthetic[position - len(self.classic)]


def training_items_of(train, tokenizer, seq_len: int, *, model=None):
    """The Trainer items of the training data: the blocks of ``seq_len`` tokens of token shards
    (``slimlm.shards.TokenShards``, read lazily from disk) or of a list of texts (tokenised here,
    in memory: a small corpus)."""
    from slimlm.data import TokenBlocks
    from slimlm.shards import token_blocks

    blocks = token_blocks(train, tokenizer, seq_len, model=model)
    return training_items(blocks) if isinstance(blocks, TokenBlocks) else blocks


class SeededOrder:
    """A ``transformers.Trainer`` mixin: a map-style training set is visited in the seeded order of
    ``slimlm.shards.BlockSampler`` (computed on the fly: constant memory for any number of blocks,
    where the default sampler holds a permutation of them all), the same order for a run and its
    resume; accelerate splits its batches between the ranks. A dataset that draws its own order
    (``ordered`` True: ``slimlm.distill.mixture.SourceMixture``) is read in index order.

    A resumed run starts the sampler at the epoch it resumes in (``resumed_epoch_callback``): on
    several processes the Trainer's ``set_epoch`` does not reach the sampler in that epoch, and
    a sampler left at epoch 0 would serve epoch 0's order again."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resumed_epoch = resumed_epoch_callback()
        self.add_callback(self.resumed_epoch)

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_utils import has_length

        from slimlm.shards import BlockSampler

        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if dataset is None or not has_length(dataset):
            return super()._get_train_sampler(train_dataset)
        if getattr(dataset, "ordered", False) is True:
            return torch.utils.data.SequentialSampler(dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        self.resumed_epoch.sampler = BlockSampler(len(dataset), seed=seed)
        return self.resumed_epoch.sampler


def resumed_epoch_callback():
    """A TrainerCallback that sets its ``sampler`` (a ``BlockSampler``, or None) to the epoch the
    training begins in, ``int(state.epoch)`` (the Trainer's epoch + batches done / batches per
    epoch): 0 for a new run, the checkpoint's for a resumed one.
    The Trainer calls ``set_epoch`` on its data loader before each epoch, but in the epoch a run
    resumes in on several processes that call stops short: accelerate's ``skip_first_batches``
    wraps the sharded batch sampler (``BatchSamplerShard``) in a ``SkipBatchSampler``, which
    puts the sampler one level deeper than accelerate's ``DataLoaderShard.set_epoch`` and the
    Trainer's own fallback look. Later epochs' ``set_epoch`` reaches it (and agrees with its own
    count: a sampler moves to the next epoch when it has served one)."""
    from transformers import TrainerCallback

    class ResumedEpochCallback(TrainerCallback):
        def __init__(self):
            self.sampler = None

        def on_train_begin(self, args, state, control, **kwargs):
            if self.sampler is not None:
                self.sampler.set_epoch(int(state.epoch or 0))
            return control

    return ResumedEpochCallback()
