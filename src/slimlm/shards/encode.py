"""Documents to token ids: the documents of the sources from a position on, batches of
``batch_chars`` characters, and ``_Encoder`` run in this process or by ``num_proc`` worker
processes (in order, at most two batches per worker in flight)."""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
from typing import Iterator

import numpy as np

from slimlm.data import read_source
from slimlm.errors import InputError
from slimlm.shards.options import TokenizeOptions, held_out


def _documents(sources: list[dict], options: TokenizeOptions, start=(0, 0)) -> Iterator[tuple[tuple[int, int], str]]:
    """((source index, document index), text) from ``start`` on; every document counts, blank ones too
    (a document on the other side of the split ``options.documents`` asks for comes as blank text)."""
    for index, source in enumerate(sources):
        if index < start[0]:
            continue
        skip = start[1] if index == start[0] else 0
        texts = _hub_texts(source, options.text_field) if "hub" in source else \
            read_source(source["path"], options.text_field, options.split)
        for number, text in enumerate(texts):
            if number >= skip:
                if options.documents != "all" and \
                        held_out(options.seed, index, number, options.heldout_fraction) != (options.documents == "heldout"):
                    text = ""
                yield (index, number), text


def _hub_texts(source: dict, text_field: str) -> Iterator[str]:
    import datasets

    name = f"hub:{source['hub']}"
    try:
        rows = datasets.load_dataset(source["hub"], source["config"], split=source["split"], streaming=True)
    except Exception as error:  # unknown dataset, config or split, no network: the hub's own words
        raise InputError(f"data {name}: {' '.join(str(error).split())[:300]}") from None
    for row in rows:
        value = row.get(text_field)
        if value is not None and not isinstance(value, str):
            raise InputError(f"data {name}: field {text_field!r} is {type(value).__name__}, not a string")
        if value is None and text_field not in row:
            raise InputError(f"data {name}: no text field {text_field!r} (has: {', '.join(row)})")
        yield value or ""


def _batches(documents, batch_chars: int):
    """(texts, positions) of consecutive documents, each batch at least ``batch_chars`` characters but the last."""
    texts, positions, chars = [], [], 0
    for position, text in documents:
        texts.append(text)
        positions.append(position)
        chars += len(text)
        if chars >= batch_chars:
            yield texts, positions
            texts, positions, chars = [], [], 0
    if texts:
        yield texts, positions


class _Encoder:
    """A batch of documents → (their tokens concatenated, each document's token count; 0 for one left out)."""

    def __init__(self, tokenizer, *, add_bos: bool, add_eos: bool, dtype: np.dtype, bound: int):
        self.tokenizer, self.dtype, self.bound = tokenizer, dtype, bound
        self.prefix = [tokenizer.bos_token_id] if add_bos else []
        self.suffix = [tokenizer.eos_token_id] if add_eos else []
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        # The fast tokenizer's own batch encoding skips what the transformers wrapper builds around the ids.
        self.encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __getstate__(self):
        return {**self.__dict__, "encode_batch": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        backend = self.tokenizer.backend_tokenizer if getattr(self.tokenizer, "is_fast", False) else None
        self.encode_batch = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        kept = [index for index, text in enumerate(texts) if text.strip()]
        batch = [texts[index] for index in kept]
        if not batch:
            encoded = []
        elif self.encode_batch is not None:
            encoded = [encoding.ids for encoding in self.encode_batch(batch, add_special_tokens=False)]
        else:
            encoded = self.tokenizer(batch, add_special_tokens=False)["input_ids"]
        extra = len(self.prefix) + len(self.suffix)
        lengths = np.zeros(len(texts), dtype=np.int64)
        for index, ids in zip(kept, encoded):
            lengths[index] = len(ids) + extra if ids else 0
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        start = 0
        for ids in encoded:
            if ids:
                document = self.prefix + ids + self.suffix if extra else ids
                tokens[start : start + len(document)] = document
                start += len(document)
        if tokens.size and int(tokens.max()) >= self.bound:
            raise ValueError(f"the tokenizer gave id {int(tokens.max())}, past its vocabulary of {self.bound}")
        return tokens, lengths


_WORKER: list[_Encoder] = []


def _start_worker(encoder: _Encoder) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles an interrupt and ends the pool
    _WORKER[:] = [encoder]


def _encode_in_worker(texts: list[str]):
    return _WORKER[0](texts)


@contextlib.contextmanager
def _quiet_tokenizers_parallelism():
    """Workers forked from a process whose tokenizer ran threads turn them off (one per core is
    what the pool is for); saying so first keeps tokenizers from warning about it in each."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _encoded(batches, encoder: _Encoder, num_proc: int):
    """(tokens, lengths, positions) per batch, in order; with ``num_proc`` > 1 encoded by that many
    worker processes, at most two batches each in flight (reading never runs ahead of them)."""
    if num_proc == 1:
        for texts, positions in batches:
            yield (*encoder(texts), positions)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with _quiet_tokenizers_parallelism():
        pool = context.Pool(num_proc, initializer=_start_worker, initargs=(encoder,))
    try:
        pending = collections.deque()
        for texts, positions in batches:
            pending.append((pool.apply_async(_encode_in_worker, (texts,)), positions))
            if len(pending) >= 2 * num_proc:
                result, positions = pending.popleft()
                yield (*result.get(), positions)
        while pending:
            result, positions = pending.popleft()
            yield (*result.get(), positions)
    finally:
        pool.terminate()
        pool.join()
