"""Synthetic distillation data: text the teacher writes itself.

``generate_synthetic`` samples continuations (or chat answers) of prompts from the teacher
in batches with the KV cache and appends them to a JSONL file, one record per line::

    {"prompt": ..., "generation": ..., "text": prompt + generation, "sample": i,
     "num_new_tokens": n, "teacher": {"name": ..., "fingerprint": ...},
     "sampling": {"max_new_tokens": ..., "temperature": ..., "top_p": ..., "seed": ...}}

A run that stops midway resumes: prompts whose samples are already in the file are skipped.
Identical generations are written once, and generations outside the length bounds are dropped.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from slimlm.errors import InputError
from slimlm.fingerprint import model_fingerprint

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class SamplingParams:
    """How the teacher samples; recorded in every record for provenance."""

    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    num_return_sequences: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")


class SyntheticDataset(torch.utils.data.Dataset):
    """The records of a synthetic JSONL file (dicts, see the module docstring)."""

    def __init__(self, records: list[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.records[index]

    def texts(self) -> list[str]:
        """Prompt + generation of every record: what the student is distilled on."""
        return [record["text"] for record in self.records]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SyntheticDataset":
        return cls(read_jsonl(path))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSONL file; a torn last line (an interrupted write) is ignored."""
    records = []
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) or all(not rest.strip() for rest in lines[number:]):
                break  # the last write was interrupted; that record is regenerated
            raise InputError(f"{path}:{number} is not valid JSON") from None
    return records


def _drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut a last line that an interrupted run left without its newline, so appends stay valid JSONL."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def load_prompts(path: str | os.PathLike, field: str = "prompt") -> list[str]:
    """Prompts from a JSONL file (``field`` of each record) or a text file (one per non-empty line)."""
    if not os.path.isfile(path):
        raise InputError(f"prompts file {path} does not exist")
    if str(path).endswith((".jsonl", ".json")):
        prompts = []
        for number, record in enumerate(read_jsonl(path), start=1):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{path}: record {number} has no string field {field!r}")
            prompts.append(record[field])
    else:
        with open(path, encoding="utf-8") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    if not prompts:
        raise InputError(f"prompts file {path} holds no prompts")
    return prompts


def prompts_from_texts(texts: Iterable[str], *, max_prompts: int, sentences: int = 1, min_chars: int = 20) -> list[str]:
    """Cut prompts from a classic corpus: the first ``sentences`` sentences of each text
    (paragraph), skipping fragments shorter than ``min_chars``; duplicates dropped."""
    prompts, seen = [], set()
    for text in texts:
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if len(paragraph) < min_chars:
                continue
            prompt = " ".join(_SENTENCE_END.split(paragraph)[:sentences])
            if len(prompt) >= min_chars and prompt not in seen:
                seen.add(prompt)
                prompts.append(prompt)
                if len(prompts) == max_prompts:
                    return prompts
    return prompts


def _encode_prompt(tokenizer, prompt: str, chat_template) -> list[int]:
    if chat_template is None:
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    template = None if chat_template is True else chat_template
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], chat_template=template, add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_generation(teacher, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
                     temperature: float = 0.8, top_p: float = 0.95, num_return_sequences: int = 1,
                     batch_size: int = 8, seed: int = 0, chat_template=None, min_new_tokens: int = 1) -> list[list[int]]:
    """Check generation settings against the teacher and the prompts before anything is
    written (ValueError naming the setting): sampling values, batch size, prompts that tokenise
    to nothing or leave no room for ``max_new_tokens`` in the teacher's context. Returns the
    prompts' token ids."""
    SamplingParams(max_new_tokens, temperature, top_p, num_return_sequences, seed).check()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts given")
    if min_new_tokens < 0 or min_new_tokens > max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    encoded = [_encode_prompt(tokenizer, prompt, chat_template) for prompt in prompts]
    context = _context_length(teacher)
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"prompt {index} is empty after tokenisation")
        if context is not None and len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                f"the teacher's context of {context} tokens"
            )
    return encoded


def generate_synthetic(
    teacher,
    tokenizer,
    prompts: Sequence[str],
    *,
    out_path: str | os.PathLike,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    chat_template=None,
    min_new_tokens: int = 1,
    dedupe: bool = True,
    progress: bool = True,
) -> SyntheticDataset:
    """Sample ``num_return_sequences`` generations per prompt from ``teacher`` and append them to ``out_path``.

    ``chat_template``: None continues the raw prompt; True wraps it as a user turn with the
    tokenizer's chat template; a string is used as the template. Each batch is sampled with
    ``torch.manual_seed(seed + index of its first prompt)``, so a given batch is reproducible.
    Returns every record in the file (earlier runs' included).
    """
    params = SamplingParams(max_new_tokens, temperature, top_p, num_return_sequences, seed)
    encoded = check_generation(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, num_return_sequences=num_return_sequences, batch_size=batch_size,
                               seed=seed, chat_template=chat_template, min_new_tokens=min_new_tokens)

    if os.path.exists(out_path):
        _drop_torn_tail(out_path)
        records = read_jsonl(out_path)
    else:
        records = []
    done = {record["prompt"] for record in records}
    seen = {" ".join(record["generation"].split()) for record in records}
    todo = [index for index, prompt in enumerate(prompts) if prompt not in done]
    provenance = {
        "name": getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__,
        "fingerprint": model_fingerprint(teacher),
    }
    sampling = vars(params)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    bar = tqdm(total=len(todo), desc="generating", unit="prompt", disable=not progress)
    try:
        with open(out_path, "a", encoding="utf-8") as handle:
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                width = max(len(encoded[i]) for i in batch)
                # Left padding, so every prompt ends where generation starts.
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, index in enumerate(batch):
                    ids = encoded[index]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention_mask[row, width - len(ids) :] = 1
                torch.manual_seed(seed + batch[0])
                with torch.no_grad():
                    output = teacher.generate(
                        input_ids=input_ids.to(device),
                        attention_mask=attention_mask.to(device),
                        do_sample=True,
                        temperature=temperature,
                        top_p=top_p,
                        max_new_tokens=max_new_tokens,
                        num_return_sequences=num_return_sequences,
                        pad_token_id=pad_id,
                        use_cache=True,
                    )
                new_tokens = output[:, width:].cpu()
                for row in range(new_tokens.shape[0]):
                    index = batch[row // num_return_sequences]
                    tokens = new_tokens[row]
                    if tokenizer.eos_token_id is not None:
                        stops = (tokens == tokenizer.eos_token_id).nonzero()
                        if len(stops):
                            tokens = tokens[: stops[0, 0]]
                    generation = tokenizer.decode(tokens, skip_special_tokens=True)
                    key = " ".join(generation.split())
                    if len(tokens) < min_new_tokens or not key or (dedupe and key in seen):
                        continue
                    seen.add(key)
                    record = {
                        "prompt": prompts[index],
                        "generation": generation,
                        "text": prompts[index] + generation,
                        "sample": row % num_return_sequences,
                        "num_new_tokens": int(len(tokens)),
                        "teacher": provenance,
                        "sampling": sampling,
                    }
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    records.append(record)
                handle.flush()
                bar.update(len(batch))
    finally:
        bar.close()
        teacher.train(was_training)
    return SyntheticDataset(records)


def mix(classic: Sequence, synthetic: Sequence, *, synthetic_fraction: float, num_samples: int | None = None, seed: int = 0) -> list:
    """A shuffled mixture in which ``synthetic_fraction`` of the items come from ``synthetic``.

    ``num_samples`` defaults to the largest count reachable without repeating an item.
    Items are drawn without replacement within each source (deterministic for a seed).
    """
    if not 0.0 <= synthetic_fraction <= 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
    if num_samples is None:
        limits = []
        if synthetic_fraction > 0:
            limits.append(len(synthetic) / synthetic_fraction)
        if synthetic_fraction < 1:
            limits.append(len(classic) / (1.0 - synthetic_fraction))
        num_samples = int(min(limits))
    num_synthetic = round(num_samples * synthetic_fraction)
    num_classic = num_samples - num_synthetic
    if num_synthetic > len(synthetic) or num_classic > len(classic):
        raise ValueError(
            f"cannot draw {num_synthetic} synthetic and {num_classic} classic items "
            f"from {len(synthetic)} synthetic and {len(classic)} classic"
        )
    if num_samples == 0:
        raise ValueError("the mixture would be empty (no classic or synthetic items for this fraction)")
    generator = torch.Generator().manual_seed(seed)
    picked = [synthetic[i] for i in torch.randperm(len(synthetic), generator=generator)[:num_synthetic].tolist()]
    picked += [classic[i] for i in torch.randperm(len(classic), generator=generator)[:num_classic].tolist()]
    order = torch.randperm(len(picked), generator=generator).tolist()
    return [picked[i] for i in order]
