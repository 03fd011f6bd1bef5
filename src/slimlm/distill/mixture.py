"""A training mix that follows the student's gaps: Sheared-LLaMA's dynamic batch loading
(Xia et al. 2023, arXiv 2310.06694, Algorithm 1) with the teacher as the reference.

``SourceMixture`` draws each batch from one source with the sampling weights in force at that
batch (a weight history, saved with the checkpoints, so a resumed run draws the same items);
``dynamic_mix_callback`` measures the student's held-out loss per source every few steps and
moves weight to the sources where it exceeds the teacher's (``reference_losses``) the most,
``update_weights``."""
from __future__ import annotations

import math
import zlib

import numpy as np
import torch

from slimlm.errors import InputError

# Batches whose source draws are made together; the mixture keeps each source's count of draws
# at every span's start (O(num_batches / _SPAN) memory) and the draws of one span.
_SPAN = 1024


def _distribution(weights, names: list[str], what: str = "weights") -> dict[str, float]:
    """``weights`` normalised to sum 1, in the order of ``names``; InputError naming the source
    missing, unknown or with a negative or non-finite weight, or when they sum to 0."""
    _same_sources(weights, names, what)
    values = {name: weights[name] for name in names}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InputError(f"{what}[{name!r}] must be a finite number >= 0, got {value!r}")
    total = sum(values.values())
    if total <= 0:
        raise InputError(f"{what} sum to 0: at least one source needs a positive weight")
    return {name: value / total for name, value in values.items()}


def _same_sources(given, names, what: str) -> None:
    """InputError naming the sources ``given`` (a dict) lacks or has beyond ``names``."""
    if not isinstance(given, dict):
        raise InputError(f"{what} must be a dict of source name to value, got {type(given).__name__}")
    missing = [name for name in names if name not in given]
    unknown = [name for name in given if name not in names]
    if missing or unknown:
        parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
                ([f"unknown {', '.join(map(repr, unknown))}"] if unknown else [])
        raise InputError(f"{what} must name exactly the sources {', '.join(map(repr, names))}: {'; '.join(parts)}")


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return value


class SourceMixture(torch.utils.data.Dataset):
    """``num_items`` training items drawn from ``sources`` ({name: map-style dataset}) batch by
    batch: item i lies in batch b = i // batch_size, and every item of batch b comes from one
    source, drawn with the weights in force at b (``weights_at``) by a uniform number that
    depends on (seed, b) only. The k-th batch drawn from a source reads its positions k·batch_size … (k+1)·batch_size − 1
    of that source's walk: pass p of the walk visits the source in the order of
    ``slimlm.shards.Permutation(len(source), seed of (seed, name), p)``, so a source repeats an
    item only after it has served them all. ``self[i]`` depends on i, seed and the weight
    history only, never on the order of the calls.

    Read in order (``ordered``: ``SeededOrder`` gives it a ``SequentialSampler``) with
    ``per_device_train_batch_size == batch_size``, every device batch is one source's, so the
    collator stacks items with the same fields (a source with cached teacher top-k beside one
    without). Memory: the sources' counts at every 1024th batch and the draws of 1024 batches."""

    ordered = True

    def __init__(self, sources: dict, weights: dict[str, float], *, batch_size: int, num_items: int, seed: int = 0):
        if not isinstance(sources, dict) or not sources:
            raise InputError("a source mixture needs a dict of at least one named source")
        for name, source in sources.items():
            if not isinstance(name, str) or not name:
                raise InputError(f"source names must be non-empty strings, got {name!r}")
            if len(source) == 0:
                raise InputError(f"source {name!r} is empty")
        self.sources = dict(sources)
        self.names = list(sources)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.num_items = _positive_int("num_items", num_items)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.history: list[tuple[int, dict[str, float]]] = [(0, _distribution(weights, self.names))]
        self.last_batch_read = -1
        self._source_seeds = [int(np.random.SeedSequence([seed % (1 << 64), zlib.crc32(name.encode())])
                                  .generate_state(1, np.uint64)[0]) for name in self.names]
        self._reset_walk()

    @property
    def num_batches(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __len__(self) -> int:
        return self.num_items

    def weights_at(self, batch: int) -> dict[str, float]:
        """The sampling weights batch ``batch`` is drawn with: the last history entry starting at
        or before it."""
        if batch < 0:
            raise IndexError(f"batch {batch} is negative")
        return dict(next(weights for start, weights in reversed(self.history) if start <= batch))

    def set_weights(self, weights: dict[str, float], *, from_batch: int) -> None:
        """Draw batch ``from_batch`` and the later ones with ``weights`` (normalised); batches
        before it keep their draws. Entries of the history from ``from_batch`` on are replaced."""
        if isinstance(from_batch, bool) or not isinstance(from_batch, int) or from_batch < 0:
            raise InputError(f"from_batch must be an int >= 0, got {from_batch!r}")
        distribution = _distribution(weights, self.names)
        self.history = [(start, w) for start, w in self.history if start < from_batch] + [(from_batch, distribution)]
        del self._counts[from_batch // _SPAN + 1:]
        if self._span is not None and (self._span[0] + 1) * _SPAN > from_batch:
            self._span = None
        if self._last_batch is not None and self._last_batch[0] >= from_batch:
            self._last_batch = None

    def source_at(self, batch: int) -> str:
        """The name of the source batch ``batch`` is drawn from."""
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} outside [0, {self.num_batches})")
        sources, _ = self._draws(batch // _SPAN)
        return self.names[int(sources[batch % _SPAN])]

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_items:
            raise IndexError(index)
        batch, offset = divmod(int(index), self.batch_size)
        source, positions = self._batch(batch)
        self.last_batch_read = max(self.last_batch_read, batch)
        return self.sources[self.names[source]][int(positions[offset])]

    def _batch(self, batch: int) -> tuple[int, np.ndarray]:
        """The source of ``batch`` and the positions in it of the batch's items (one
        permutation call per batch and walk pass, kept for the batch's other items)."""
        if self._last_batch is not None and self._last_batch[0] == batch:
            return self._last_batch[1], self._last_batch[2]
        sources, ranks = self._draws(batch // _SPAN)
        source, rank = int(sources[batch % _SPAN]), int(ranks[batch % _SPAN])
        size = len(self.sources[self.names[source]])
        walk = rank * self.batch_size + np.arange(self.batch_size)
        passes, steps = np.divmod(walk, size)
        positions = np.empty_like(walk)
        for walk_pass in np.unique(passes).tolist():
            chosen = passes == walk_pass
            positions[chosen] = self._permutation(source, walk_pass)(steps[chosen])
        self._last_batch = (batch, source, positions)
        return source, positions

    def state(self) -> dict:
        """What a checkpoint keeps (JSON-able): the weight history and what it applies to."""
        return {"names": list(self.names), "seed": self.seed, "batch_size": self.batch_size,
                "num_items": self.num_items, "history": [[start, dict(weights)] for start, weights in self.history]}

    def load_state(self, state: dict) -> None:
        """Take the weight history of ``state`` (from ``state()``); InputError when it was
        written for other sources, another seed or another batch size (it would draw other items)."""
        for key in ("names", "seed", "batch_size"):
            mine = self.names if key == "names" else getattr(self, key)
            if state.get(key) != mine:
                raise InputError(f"the saved data mix has {key} {state.get(key)!r}, this mixture {mine!r}")
        history = [(int(start), _distribution(weights, self.names)) for start, weights in state["history"]]
        if not history or history[0][0] != 0 or any(b[0] <= a[0] for a, b in zip(history, history[1:])):
            raise InputError("the saved data mix's history must start at batch 0 and increase")
        self.history = history
        self._reset_walk()

    def _reset_walk(self) -> None:
        self._counts = [np.zeros(len(self.names), dtype=np.int64)]  # draws per source before span j
        self._span = None  # (j, sources, ranks) of the span last drawn
        self._last_batch = None  # (batch, source, positions) of the batch last read
        self._permutations = {}

    def _draws(self, span: int) -> tuple[np.ndarray, np.ndarray]:
        """The source of each batch of ``span`` and how many batches of that source came before."""
        if self._span is not None and self._span[0] == span:
            return self._span[1], self._span[2]
        while len(self._counts) <= span:
            done = len(self._counts) - 1
            sources = self._sources(done)
            self._counts.append(self._counts[done] + np.bincount(sources, minlength=len(self.names)))
        sources = self._sources(span)
        ranks = np.empty_like(sources)
        for source in range(len(self.names)):
            chosen = sources == source
            ranks[chosen] = self._counts[span][source] + np.arange(int(chosen.sum()))
        self._span = (span, sources, ranks)
        return sources, ranks

    def _sources(self, span: int) -> np.ndarray:
        """Source indices of the batches of ``span``: u_b uniform in [0, 1) from (seed, b), and
        the first source whose cumulative weight at b exceeds u_b."""
        first = span * _SPAN
        batches = np.arange(first, min(first + _SPAN, self.num_batches))
        uniform = np.random.default_rng([self.seed % (1 << 64), span]).random(_SPAN)[:len(batches)]
        starts = np.array([start for start, _ in self.history])
        cumulative = np.cumsum([[w[name] for name in self.names] for _, w in self.history], axis=1)
        cumulative /= cumulative[:, -1:]  # exactly 1 at the end: u_b < 1 never picks a weight-0 last source
        in_force = cumulative[np.searchsorted(starts, batches, side="right") - 1]
        return (in_force <= uniform[:, None]).sum(axis=1)

    def _permutation(self, source: int, walk_pass: int):
        from slimlm.shards import Permutation

        cached = self._permutations.get(source)
        if cached is None or cached[0] != walk_pass:
            size = len(self.sources[self.names[source]])
            cached = self._permutations[source] = (walk_pass, Permutation(size, self._source_seeds[source], walk_pass))
        return cached[1]


class BlockRanges(torch.utils.data.Dataset):
    """The items of ``blocks`` (a map-style dataset) at the indices of ``ranges`` ([start, stop)
    pairs), in order: a ``Subset`` that holds the ranges, not one index per block, so a source of
    10⁸ blocks costs a few numbers."""

    def __init__(self, blocks, ranges):
        self.blocks = blocks
        self.ranges = [(int(start), int(stop)) for start, stop in ranges if stop > start]
        self._ends = np.cumsum([stop - start for start, stop in self.ranges], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self._ends, index, side="right"))
        before = int(self._ends[part - 1]) if part else 0
        return self.blocks[self.ranges[part][0] + int(index) - before]


def corpus_sources(shards, blocks, seq_len: int) -> dict[str, BlockRanges]:
    """{name: its blocks} of each data source of the token ``shards`` (``TokenShards.source_names``),
    ``blocks`` being the shards' blocks of ``seq_len`` tokens: the blocks that lie wholly in that
    source's tokens (a block across two sources' boundary belongs to neither). InputError when a
    source holds no whole block."""
    names = shards.source_names()
    ranges: dict[int, list[tuple[int, int]]] = {}
    for source, start, stop in shards.source_ranges():
        first, last = -(-start // seq_len), min(stop // seq_len, len(blocks))
        ranges.setdefault(source, []).append((first, last))
    sources = {}
    for index, name in enumerate(names):
        sources[name] = BlockRanges(blocks, ranges.get(index, []))
        if len(sources[name]) == 0:
            raise InputError(f"data source {name!r} of the token shards {shards.path} holds no whole block of "
                             f"{seq_len} tokens: give it more text or leave it out of the data")
    return sources


def update_weights(weights: dict[str, float], excess: dict[str, float], *, step_size: float = 1.0,
                   smoothing: float = 1e-4, min_weight: float = 0.0, max_weight: float = 1.0) -> dict[str, float]:
    """Sheared-LLaMA's update of the sampling weights from each source's excess loss
    (student − reference on held-out data):

        α_i = w_i · exp(step_size · max(excess_i, 0)),   w'_i = (1 − smoothing) · α_i / Σ_j α_j + smoothing / k

    for k sources, then clipped to [min_weight, max_weight] with the mass clipped off (or added)
    spread over the other sources in proportion to their weights, so the result sums to 1 and
    keeps both bounds. Defaults are the paper's: step size η = 1, smoothing c = 1e-4 (taken from
    DoReMi), no bounds. A source at excess ≤ 0 for all keeps its weight up to the smoothing."""
    names = list(weights)
    current = _distribution(weights, names)
    _same_sources(excess, names, "excess")
    for name, value in excess.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"excess[{name!r}] must be a finite number, got {value!r}")
    if not (math.isfinite(step_size) and step_size >= 0):
        raise InputError(f"step_size must be a finite number >= 0, got {step_size!r}")
    if not 0 <= smoothing <= 1:
        raise InputError(f"smoothing must be in [0, 1], got {smoothing!r}")
    if not 0 <= min_weight <= max_weight:
        raise InputError(f"the bounds must satisfy 0 <= min_weight <= max_weight, "
                         f"got {min_weight!r} and {max_weight!r}")
    if len(names) * min_weight > 1 + 1e-12 or len(names) * max_weight < 1 - 1e-12:
        raise InputError(f"no {len(names)} weights in [{min_weight}, {max_weight}] sum to 1")
    with np.errstate(divide="ignore"):
        log_alpha = np.log([current[name] for name in names]) + \
            step_size * np.maximum([excess[name] for name in names], 0.0)
    alpha = np.exp(log_alpha - log_alpha.max())
    smoothed = (1 - smoothing) * alpha / alpha.sum() + smoothing / len(names)
    return dict(zip(names, _bounded(smoothed, min_weight, max_weight).tolist()))


def _bounded(weights: np.ndarray, low: float, high: float) -> np.ndarray:
    """clip(λ · weights, low, high) with the λ that makes it sum to 1: the weights outside the
    bounds set to them, the others rescaled in proportion (λ by bisection; the sum is monotone
    in λ). Weights of 0 take, equally, what the positive ones cannot when all sit at ``high``."""
    if low <= weights.min() and weights.max() <= high:
        return weights

    def total(scale: float) -> float:
        return float(np.clip(scale * weights, low, high).sum())

    positive = weights > 0
    top = high / weights[positive].min()
    if total(top) < 1:
        spread = np.where(positive, high, low)
        spread[~positive] += (1 - spread.sum()) / int((~positive).sum())
        return spread
    below, above = 0.0, top
    for _ in range(200):
        middle = 0.5 * (below + above)
        below, above = (middle, above) if total(middle) < 1 else (below, middle)
    return np.clip(above * weights, low, high)


def _token_blocks(items, name: str):
    """The held-out ``items`` of source ``name`` as one ``TokenBlocks`` (right-padded with id 0,
    attention 0, to the longest)."""
    from slimlm.data import TokenBlocks

    if not items:
        raise InputError(f"the held-out slice of source {name!r} is empty")
    rows = [(torch.as_tensor(item["input_ids"]).long(), torch.as_tensor(item["attention_mask"]).long())
            for item in items]
    length = max(ids.shape[-1] for ids, _ in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for row, (ids, attention) in enumerate(rows):
        input_ids[row, :ids.shape[-1]], mask[row, :attention.shape[-1]] = ids, attention
    return TokenBlocks(input_ids, mask)


def _heldout_losses(model, blocks: dict, batch_size: int) -> dict[str, float]:
    from slimlm.evaluate import perplexity

    return {name: perplexity(model, source_blocks, batch_size=batch_size, progress=False)["nll"]
            for name, source_blocks in blocks.items()}


def reference_losses(teacher, heldout: dict[str, list[dict]], *, batch_size: int = 8) -> dict[str, float]:
    """The teacher's mean token NLL (nats, ``slimlm.evaluate.perplexity``'s: every next-token
    pair of real tokens) on each source's held-out items ({source: Trainer items})."""
    if not isinstance(heldout, dict) or not heldout:
        raise InputError("heldout must be a dict of source name to held-out items")
    _positive_int("batch_size", batch_size)
    return _heldout_losses(teacher, {name: _token_blocks(items, name) for name, items in heldout.items()}, batch_size)


def _from_rank_zero(values: list[float]) -> list[float]:
    """``values`` as rank 0 has them (under torch.distributed), so every rank draws the same mix."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return tensor.tolist()


def _sampler_of(loader):
    """The index sampler under a data loader and its wrappers (accelerate's sharding and
    skipping batch samplers, a BatchSampler): the first object with neither a ``batch_sampler``
    nor a ``sampler``; None when there is none."""
    node = loader
    for _ in range(8):
        inner = getattr(node, "batch_sampler", None)
        inner = getattr(node, "sampler", None) if inner is None else inner
        if inner is None:
            return node if node is not loader else None
        node = inner
    return None


def dynamic_mix_callback(mixture: SourceMixture, heldout: dict[str, list[dict]], reference: dict[str, float], *,
                         every: int, batch_size: int = 8, log=None, **update_kwargs):
    """A TrainerCallback for Sheared-LLaMA's dynamic batch loading over ``mixture`` (the
    Trainer's train_dataset). Every ``every`` optimizer steps while steps remain, it scores the
    student on each source's ``heldout`` items (mean token NLL, ``slimlm.evaluate.perplexity``:
    eval mode, no grad, training mode restored), takes excess = NLL − ``reference[source]`` (the
    teacher's, ``reference_losses``), and sets ``update_weights(weights now, excess,
    **update_kwargs)`` from the next batch the data loader reads: (global_step ·
    gradient_accumulation_steps + 1) · world_size, since each process has read its step's
    batches and one ahead (accelerate's loader looks one batch ahead to spot the end), and
    the processes take the batches in turn. Rank 0's losses decide for all ranks.

    Logs ``mix/<source>`` (the weights; at step 0 the starting ones) and
    ``mix_excess/<source>`` into the Trainer's ``log_history``, and one line per update to
    ``log``. The weight history is kept in the Trainer's state (``stateful_callbacks``,
    saved with every checkpoint) and restored at a resume, so a resumed run draws the same
    batches. At train begin, InputError when the run cannot replay its mix: the loader has
    worker processes (each holds its own copy of the mixture), a batch size other than the
    mixture's, split batches, a sampler that is not sequential (train with ``SeededOrder``,
    e.g. ``DistillationTrainer``), or more batches to read than the mixture holds (one epoch:
    ``num_items`` ≥ max_steps · batch · accumulation · world size)."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import ExportableState

    if not isinstance(mixture, SourceMixture):
        raise InputError(f"mixture must be a SourceMixture, got {type(mixture).__name__}")
    _positive_int("every", every)
    _positive_int("batch_size", batch_size)
    _same_sources(heldout, mixture.names, "heldout")
    _same_sources(reference, mixture.names, "reference")
    for name, value in reference.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"reference[{name!r}] must be a finite loss, got {value!r}")
    update_weights(mixture.weights_at(0), {name: 0.0 for name in mixture.names}, **update_kwargs)
    blocks = {name: _token_blocks(heldout[name], name) for name in mixture.names}

    class DynamicMixCallback(TrainerCallback, ExportableState):
        def state(self) -> dict:
            return {"args": {}, "attributes": {"mixture": mixture.state()}}

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self._check(args, state, train_dataloader)
            stored = (state.stateful_callbacks or {}).get(type(self).__name__) if state.global_step else None
            if isinstance(stored, list):
                stored = stored[-1] if stored else None
            saved = (stored or {}).get("attributes", {}).get("mixture")
            if saved:
                mixture.load_state(saved)
                if log is not None and state.is_world_process_zero:
                    log(f"[distill] resuming the data mix: {len(mixture.history)} weight setting(s) restored")
            elif state.global_step == 0:
                weights = mixture.weights_at(0)
                state.log_history.append({"step": 0, **{f"mix/{name}": round(w, 6) for name, w in weights.items()}})
            return control

        def _check(self, args, state, loader) -> None:
            if args.dataloader_num_workers:
                raise InputError(f"the dynamic data mix needs --dataloader_num_workers 0, got "
                                 f"{args.dataloader_num_workers} (each worker would hold its own copy of the mix)")
            if args.per_device_train_batch_size != mixture.batch_size:
                raise InputError(f"--per_device_train_batch_size {args.per_device_train_batch_size} differs from the "
                                 f"data mix's batch size {mixture.batch_size}: its batches would mix sources")
            if getattr(args.accelerator_config, "split_batches", False):
                raise InputError("the dynamic data mix needs split_batches off: a split batch would mix sources")
            sampler = _sampler_of(loader) if loader is not None else None
            if sampler is not None and not isinstance(sampler, torch.utils.data.SequentialSampler):
                raise InputError(f"the data mix must be read in order, got a {type(sampler).__name__}: "
                                 "train with a SeededOrder trainer (DistillationTrainer)")
            reads = state.max_steps * args.gradient_accumulation_steps * args.world_size * mixture.batch_size
            if reads > len(mixture):
                raise InputError(f"the run reads {reads} items (max_steps {state.max_steps} x batch "
                                 f"{mixture.batch_size} x accumulation {args.gradient_accumulation_steps} x "
                                 f"{args.world_size} process(es)), the data mix holds {len(mixture)}: "
                                 "build it with num_items >= that")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step = state.global_step
            if model is None or step % every or step >= state.max_steps or control.should_training_stop:
                return control
            next_batch = (step * args.gradient_accumulation_steps + 1) * args.world_size
            if mixture.last_batch_read >= next_batch:
                raise RuntimeError(f"the data loader has read batch {mixture.last_batch_read}, past batch {next_batch} "
                                   "where the new data mix would start: a resumed run could not replay it")
            losses = dict(zip(mixture.names, _from_rank_zero(
                list(_heldout_losses(model, blocks, batch_size).values()))))
            excess = {name: losses[name] - reference[name] for name in mixture.names}
            weights = update_weights(mixture.weights_at(next_batch), excess, **update_kwargs)
            mixture.set_weights(weights, from_batch=next_batch)
            state.log_history.append({"step": step, **{f"mix/{name}": round(w, 6) for name, w in weights.items()},
                                      **{f"mix_excess/{name}": round(e, 5) for name, e in excess.items()}})
            if log is not None and state.is_world_process_zero:
                log(f"[distill] step {step}: data mix " + ", ".join(
                    f"{name} {weights[name]:.3f} (excess {excess[name]:+.3f})" for name in mixture.names))
            return control

    return DynamicMixCallback()
