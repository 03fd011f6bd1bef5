"""Text → tokens → fixed-length blocks, for calibration and training. Nothing is fetched from a hub.

Three steps, each usable alone:

- ``load_texts(sources, text_field="text")`` reads documents from local files: plain text
  (``*.txt``, ``*.md`` and any other extension: one document per file), JSONL (``*.jsonl``,
  ``*.json`` with one object per line: one document per line's ``text_field``), Parquet
  (``*.parquet``, column ``text_field``; needs ``pyarrow``) and a ``datasets`` dataset saved
  with ``save_to_disk`` (a folder; needs ``datasets``). Globs are expanded (``**`` too).
- ``tokenize_blocks(texts, tokenizer, seq_len)`` tokenises and either packs all documents,
  separated by EOS, into blocks of exactly ``seq_len`` tokens (``pack=True``; the last,
  partial block is padded), or gives one block per document, truncated and padded
  (``pack=False``). ``attention_mask`` is 1 on real tokens and 0 on padding.
- ``TokenBlocks`` holds the result: ``sample(n, seed)``, ``split(held_out, seed)`` and
  ``batches(batch_size)`` (dicts of ``input_ids`` and ``attention_mask``, the form
  ``slimlm.importance.estimate_importance`` and the trainer take).

``load_blocks`` chains the three. ``iter_texts`` is ``load_texts`` as a stream (``source_paths``
and ``read_source`` its two halves), for readers that must not hold a corpus whole
(``slimlm.shards`` writes memory-mapped token shards from it). Every choice that involves
randomness takes a seed and gives the same blocks for the same seed on any machine.
"""
from __future__ import annotations

import codecs
import glob
import itertools
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from slimlm.errors import InputError

TEXT_SUFFIXES_JSONL = (".jsonl", ".json")
PARQUET_SUFFIX = ".parquet"


@dataclass(frozen=True)
class TokenBlocks:
    """``input_ids`` and ``attention_mask``, both LongTensors of shape (num_blocks, seq_len)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self):
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (num_blocks, seq_len), got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in all blocks."""
        return int(self.attention_mask.sum())

    def select(self, indices: torch.Tensor | Sequence[int]) -> "TokenBlocks":
        """The blocks at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return TokenBlocks(self.input_ids[index], self.attention_mask[index])

    def sample(self, num_samples: int, seed: int = 0) -> "TokenBlocks":
        """``num_samples`` distinct blocks drawn uniformly with ``seed`` (all of them, shuffled, if more are asked)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.select(order[:num_samples])

    def split(self, held_out: float | int, seed: int = 0) -> tuple["TokenBlocks", "TokenBlocks"]:
        """(train, held-out): a seeded random partition; ``held_out`` is a fraction in (0, 1) or a block count."""
        if isinstance(held_out, float):
            if not 0.0 < held_out < 1.0:
                raise ValueError(f"held_out as a fraction must be in (0, 1), got {held_out}")
            count = max(1, round(held_out * len(self)))
        else:
            count = int(held_out)
        if not 1 <= count < len(self):
            raise ValueError(f"held_out must leave at least one block on each side of {len(self)} blocks, got {held_out}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.select(order[count:].sort().values), self.select(order[:count].sort().values)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Dicts ``{"input_ids", "attention_mask"}`` of up to ``batch_size`` blocks (the last may be smaller)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = (
            torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        )
        for start in range(0, len(self), batch_size):
            index = order[start : start + batch_size]
            yield {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}


def source_paths(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The local files and saved-dataset folders ``sources`` names, in order (globs expanded and
    sorted); InputError for a missing path, a glob without a match, or nothing at all."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[str] = []
    for source in sources:
        source = os.fspath(source)
        if glob.has_magic(source):
            matches = sorted(glob.glob(source, recursive=True))
            if not matches:
                raise InputError(f"no files match {source!r}")
            paths.extend(m for m in matches if os.path.isfile(m) or _is_saved_dataset(m))
        elif os.path.exists(source):
            paths.append(source)
        else:
            raise InputError(f"{source} does not exist")
    if not paths:
        raise InputError(f"no input files in {sources!r}")
    return paths


def _is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def _not_utf8(path: str) -> InputError:
    """The error for a data file that is not UTF-8: where its first byte that is not lies (the
    file is scanned in pieces, never read whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = lines = 0
    with open(path, "rb") as handle:
        for chunk in itertools.chain(iter(lambda: handle.read(_SCAN_BYTES), b""), [b""]):
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                data = pending + chunk
                line = lines + data.count(b"\n", len(pending), error.start) + 1
                return InputError(f"data file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                                  f"{offset - len(pending) + error.start}, line {line}); re-encode it as UTF-8")
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return InputError(f"data file {path} is not UTF-8 text")


_SCAN_BYTES = 1 << 20


def _not_blank(path: str, texts: Iterable[str]) -> Iterator[str]:
    """``texts`` as they come, then an InputError if no document of the file had text besides whitespace."""
    seen_text = False
    for text in texts:
        seen_text = seen_text or bool(text.strip())
        yield text
    if not seen_text:
        raise InputError(f"data file {path} is empty or holds only whitespace")


# Text and JSONL files are UTF-8; a leading byte-order mark (as some Windows editors write) is dropped.
def _read_text_file(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    yield from _not_blank(path, [text])


def _jsonl_records(path: str, text_field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{path}:{number}: not a JSON object per line ({error})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise InputError(f"{path}:{number}: no text field {text_field!r} (has: {keys})")
                value = record[text_field]
                if not isinstance(value, str):
                    raise InputError(f"{path}:{number}: field {text_field!r} is {type(value).__name__}, not a string")
                yield value
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_jsonl(path: str, text_field: str) -> Iterator[str]:
    return _not_blank(path, _jsonl_records(path, text_field))


def _column_texts(path: str, column_names: Sequence[str], batches: Iterable[Sequence], text_field: str) -> Iterator[str]:
    """The strings of a text column read in ``batches`` (its missing values left out)."""
    if text_field not in column_names:
        raise InputError(f"{path}: no text field {text_field!r} (columns: {', '.join(column_names)})")

    def values():
        for batch in batches:
            texts = [value for value in batch if value is not None]
            if not all(isinstance(value, str) for value in texts):
                raise InputError(f"{path}: column {text_field!r} does not hold strings")
            yield from texts

    return _not_blank(path, values())


# Rows per batch when a Parquet file or a saved dataset is read: bounds the memory of one batch.
_ROWS_PER_BATCH = 1024


def _read_parquet(path: str, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow, which is not installed (pip install pyarrow)") from None
    table = parquet.ParquetFile(path)
    names = table.schema_arrow.names
    batches = (batch.column(0).to_pylist() for batch in table.iter_batches(batch_size=_ROWS_PER_BATCH,
                                                                          columns=[text_field])) \
        if text_field in names else iter(())
    yield from _column_texts(path, names, batches, text_field)


def _read_saved_dataset(path: str, text_field: str, split: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"reading the saved dataset {path} needs `datasets`, which is not installed") from None
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            raise InputError(f"{path} holds several splits ({', '.join(dataset)}); pass split= in Python (the "
                             "command line reads a dataset of one split: save that split alone with save_to_disk)")
        if split not in dataset:
            raise InputError(f"{path} has no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    batches = (batch[text_field] for batch in dataset.select_columns([text_field]).iter(batch_size=_ROWS_PER_BATCH)) \
        if text_field in dataset.column_names else iter(())
    yield from _column_texts(path, dataset.column_names, batches, text_field)


def read_source(path: str, text_field: str = "text", split: str | None = None) -> Iterator[str]:
    """The documents of one local source (a path of ``source_paths``), streamed: a text file is
    one document (read whole), a JSONL file one per line, a Parquet file or a saved dataset one
    per row, read in batches of rows. Empty and whitespace-only documents are yielded too; the
    InputError for a source without any other comes once it has been read. The errors of
    ``load_texts``."""
    lower = path.lower()
    if _is_saved_dataset(path):
        return _read_saved_dataset(path, text_field, split)
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder but not a dataset saved with save_to_disk; pass a glob for its files")
    if lower.endswith(TEXT_SUFFIXES_JSONL):
        return _read_jsonl(path, text_field)
    if lower.endswith(PARQUET_SUFFIX):
        return _read_parquet(path, text_field)
    return _read_text_file(path)


def iter_texts(
    sources: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = "text", split: str | None = None
) -> Iterator[str]:
    """``load_texts`` as a stream: one document at a time, so no source is held whole (but a
    text file, which is one document)."""
    for path in source_paths(sources):
        yield from read_source(path, text_field, split)


def load_texts(
    sources: str | os.PathLike | Iterable[str | os.PathLike], text_field: str = "text", split: str | None = None
) -> list[str]:
    """Documents from local files, folders saved by ``datasets`` and globs, in the order given (globs sorted).

    ``split`` picks one split of a saved ``DatasetDict``. Text and JSONL files are read as UTF-8
    (a leading byte-order mark is dropped). Raises ``InputError`` (a ValueError) naming the file
    for a missing path, a file that is not UTF-8, one with no document besides empty or
    whitespace-only ones, or a record without ``text_field``; ValueError for a format whose
    reader is not installed.
    """
    return list(iter_texts(sources, text_field=text_field, split=split))


def max_model_length(model_or_config) -> int | None:
    """The longest sequence a model accepts (``max_position_embeddings``), or None if it does not say."""
    config = getattr(model_or_config, "config", model_or_config)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def padding_id(tokenizer) -> int:
    """The id padding takes: the tokenizer's pad id, else its EOS, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def check_seq_len(seq_len: int, model, name: str = "seq_len") -> None:
    """InputError when ``seq_len`` (the option ``name``) is above ``model``'s
    ``max_position_embeddings`` (a model or config; None: no limit)."""
    limit = max_model_length(model) if model is not None else None
    if limit is not None and seq_len > limit:
        raise InputError(f"{name} {seq_len} is above the model's limit (max_position_embeddings = {limit})")


def tokenize_blocks(
    texts: Sequence[str],
    tokenizer,
    seq_len: int,
    *,
    pack: bool = True,
    add_eos: bool = True,
    model=None,
) -> TokenBlocks:
    """Tokenise ``texts`` (no special tokens besides EOS) into (num_blocks, seq_len) blocks.

    ``pack=True``: documents joined with EOS and cut every ``seq_len`` tokens; only the last
    block can hold padding. ``pack=False``: one block per document, truncated to ``seq_len``
    and right-padded. Padding uses the tokenizer's pad id (else EOS, else 0) with mask 0.
    Documents that are empty or whitespace only, or tokenise to nothing, are left out.
    ``model`` (a model or config) bounds ``seq_len`` by its ``max_position_embeddings``.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    check_seq_len(seq_len, model)
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, got one string; wrap it in a list")
    if len(texts) == 0:
        raise InputError("no texts to tokenise")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
    pad = padding_id(tokenizer)
    texts = [text for text in texts if text.strip()]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    documents = [ids + [eos] if add_eos else ids for ids in encoded if ids]
    if not documents:
        raise InputError("every text is empty, whitespace only or tokenised to nothing")
    if pack:
        stream = torch.tensor([token for ids in documents for token in ids], dtype=torch.long)
        num_blocks = -(-stream.numel() // seq_len)
        input_ids = torch.full((num_blocks * seq_len,), pad, dtype=torch.long)
        attention_mask = torch.zeros(num_blocks * seq_len, dtype=torch.long)
        input_ids[: stream.numel()] = stream
        attention_mask[: stream.numel()] = 1
        return TokenBlocks(input_ids.view(num_blocks, seq_len), attention_mask.view(num_blocks, seq_len))
    input_ids = torch.full((len(documents), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(documents), seq_len), dtype=torch.long)
    for row, ids in enumerate(documents):
        ids = ids[:seq_len]
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return TokenBlocks(input_ids, attention_mask)


def load_blocks(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    tokenizer,
    seq_len: int,
    *,
    text_field: str = "text",
    split: str | None = None,
    pack: bool = True,
    add_eos: bool = True,
    num_samples: int | None = None,
    seed: int = 0,
    model=None,
) -> TokenBlocks:
    """``load_texts`` → ``tokenize_blocks`` → (with ``num_samples``) a seeded ``sample``."""
    check_seq_len(seq_len, model)
    blocks = tokenize_blocks(
        load_texts(sources, text_field=text_field, split=split), tokenizer, seq_len, pack=pack, add_eos=add_eos
    )
    return blocks.sample(num_samples, seed) if num_samples is not None else blocks
