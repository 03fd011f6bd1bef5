"""Evaluation of a (pruned, distilled) causal LM: held-out perplexity, throughput, greedy samples.

    result = perplexity(model, heldout_blocks)          # {"nll", "perplexity", "tokens", "tokens_per_s", ...}
    texts = greedy_samples(model, tokenizer, ["The cat"], max_new_tokens=32)
    size = model_size(model, "path/to/folder")          # {"params", "disk_bytes", "format"}

Perplexity = exp(Σ NLL / n) over every next-token pair (t, t+1) whose two tokens are both
real (attention mask 1): padding never counts, and a block's first token is never predicted.
tokens/s is the forward (prefill) throughput of that same pass: real tokens / wall seconds.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.data import TokenBlocks
from slimlm.errors import InputError
from slimlm.options import OptionError, Options, option

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass
class EvalOptions(Options):
    """What is evaluated, declared once (``slimlm.options``): ``slimlm eval``'s flags, a recipe's
    ``eval:`` section and ``EvalOptions`` in Python. Perplexity on at most ``max_blocks`` blocks
    of ``seq_len`` tokens, ``batch_size`` at a time; a greedy sample of ``max_new_tokens`` per
    prompt; with ``speed``, inference speed (``slimlm.speed``): a ``speed_prompt_tokens`` prompt
    continued by ``speed_new_tokens`` tokens, ``speed_rounds`` timed rounds per model."""

    SECTION = "eval"

    seq_len: int = option(256, "tokens per held-out block", check="positive")
    max_blocks: int = option(64, "held-out blocks evaluated at most", check="positive")
    batch_size: int = option(8, "blocks per forward pass", check="positive")
    prompts: list[str] = option([], "prompts for a greedy sample each (a recipe's; slimlm eval takes --prompt, "
                                    "repeatable)", cli=False, flag="--prompt")
    max_new_tokens: int = option(32, "new tokens per greedy sample", check="positive")
    speed: bool = option(False, "measure inference speed, the first model (the teacher) the reference")
    speed_prompt_tokens: int = option(128, "prompt tokens of the speed measurement", check="positive",
                                      flag="--prompt-tokens")
    speed_new_tokens: int = option(32, "new tokens per speed round (at least 2: time per output token counts those after the "
                                       "first)",
                                   check="positive", flag="--new-tokens")
    speed_rounds: int = option(3, "timed rounds per model (medians)", check="positive", flag="--rounds")

    def check(self) -> None:
        if not all(isinstance(prompt, str) for prompt in self.prompts):
            raise OptionError("prompts", "must be a list of strings")
        if self.speed_new_tokens < 2:
            raise OptionError("speed_new_tokens", f"must be >= 2, got {self.speed_new_tokens}")


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def perplexity(model, blocks: TokenBlocks, *, batch_size: int = 8, progress: bool = True,
               desc: str = "perplexity") -> dict:
    """Held-out perplexity of ``model`` on ``blocks`` (see the module docstring for the mask rule).

    Returns {"nll": mean NLL in nats, "perplexity": exp(nll), "tokens": real tokens fed,
    "predicted": next-token pairs scored, "seconds": wall time of the forward passes,
    "tokens_per_s": tokens / seconds}. Raises ValueError when no pair is scorable or a
    token id is outside the model's vocabulary.
    """
    if not isinstance(blocks, TokenBlocks):
        raise ValueError(f"blocks must be a slimlm.data.TokenBlocks, got {type(blocks).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(blocks) and int(blocks.input_ids.max()) >= vocab:
        raise InputError(f"token id {int(blocks.input_ids.max())} is outside the model's vocabulary of {vocab}")
    pair_mask = blocks.attention_mask[:, 1:].bool() & blocks.attention_mask[:, :-1].bool()
    if not bool(pair_mask.any()):
        raise InputError("no block holds two consecutive real tokens: nothing to score")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll_sum, pairs, tokens, seconds = 0.0, 0, 0, 0.0
    bar = tqdm(total=len(blocks), desc=desc, unit="block", disable=not progress)
    try:
        with torch.no_grad():
            for batch in blocks.batches(batch_size):
                input_ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                start = time.perf_counter()
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - start
                targets = input_ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), -100)
                nll_sum += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                                 ignore_index=-100, reduction="sum"))
                pairs += int((targets != -100).sum())
                tokens += int(mask.sum())
                bar.update(input_ids.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    nll = nll_sum / pairs
    return {"nll": nll, "perplexity": math.exp(min(nll, 700.0)), "tokens": tokens, "predicted": pairs,
            "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)}


def greedy_samples(model, tokenizer, prompts, *, max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations (the new text only) of each prompt, one prompt at a time so no
    padding changes the result; generation stops at EOS."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"].to(device)
            if ids.shape[1] == 0:
                raise InputError(f"prompt {prompt!r} is empty after tokenisation")
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad)
            outputs.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    return outputs


def disk_bytes(spec: str | os.PathLike) -> int:
    """Bytes of the weight files of a model folder (safetensors/bin shards), or of a single file."""
    spec = os.fspath(spec)
    if os.path.isfile(spec):
        return os.path.getsize(spec)
    if not os.path.isdir(spec):
        raise ValueError(f"{spec} is neither a model folder nor a file")
    return sum(os.path.getsize(os.path.join(spec, name)) for name in os.listdir(spec)
               if name.endswith(WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(spec, name)))


def weight_format(spec: str | os.PathLike, model=None) -> str:
    """A short description of how the weights are stored: ``gguf`` or ``safetensors <dtype>``, the
    dtype config.json states (what is on disk), else the loaded model's."""
    spec = os.fspath(spec)
    if spec.endswith(".gguf"):
        return "gguf"
    config = {}
    if os.path.isfile(os.path.join(spec, "config.json")):
        with open(os.path.join(spec, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
    stated = config.get("dtype") or config.get("torch_dtype")
    dtype = str(stated) if isinstance(stated, str) else (
        str(next(model.parameters()).dtype).replace("torch.", "") if model is not None else "?")
    has_safetensors = os.path.isdir(spec) and any(name.endswith(".safetensors") for name in os.listdir(spec))
    return f"{'safetensors' if has_safetensors else 'pytorch'} {dtype}"


def count_params(model) -> int:
    """Distinct parameters (a tied LM head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def evaluate_model(model, blocks: TokenBlocks, *, tokenizer=None, prompts=(), max_new_tokens: int = 32,
                   batch_size: int = 8, spec: str | os.PathLike | None = None, progress: bool = True,
                   name: str = "model", general_blocks=None) -> dict:
    """Everything the report's table holds for one model: params, size on disk (when ``spec``
    is a path), held-out perplexity and tokens/s, and greedy samples for ``prompts``; with
    ``general_blocks`` (held-out sets of other registers than the training text: {split name:
    TokenBlocks}, or one TokenBlocks named "general") also ``<split>_perplexity`` and
    ``<split>_nll`` on each (``held_out_splits`` lists them)."""
    result = {"name": name, "params": count_params(model)}
    if spec is not None and os.path.exists(os.fspath(spec)):
        result["disk_bytes"] = disk_bytes(spec)
        result["format"] = weight_format(spec, model)
    result.update(perplexity(model, blocks, batch_size=batch_size, progress=progress, desc=f"eval {name}"))
    if general_blocks is not None and not isinstance(general_blocks, dict):
        general_blocks = {"general": general_blocks}
    for split, split_blocks in (general_blocks or {}).items():
        measured = perplexity(model, split_blocks, batch_size=batch_size, progress=progress,
                              desc=f"eval {name} ({split})")
        result[f"{split}_perplexity"], result[f"{split}_nll"] = measured["perplexity"], measured["nll"]
    if prompts:
        if tokenizer is None:
            raise ValueError("greedy samples need the tokenizer")
        result["samples"] = dict(zip(prompts, greedy_samples(model, tokenizer, prompts, max_new_tokens=max_new_tokens)))
    return result


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def held_out_splits(results: list[dict]) -> list[str]:
    """The names of the held-out sets besides the in-domain one that every result was measured
    on (``<split>_perplexity``), in the first result's order."""
    if not results:
        return []
    names = [key[: -len("_perplexity")] for key in results[0] if key.endswith("_perplexity")]
    return [name for name in names if all(f"{name}_perplexity" in result for result in results)]


def comparison_rows(results: list[dict]) -> list[list[str]]:
    """Header + one row per result: model, params, size on disk, perplexity (and its ratio to
    the first's), each other held-out set's perplexity and ratio when measured (``held_out_splits``),
    tokens/s; the first result is the reference for the relative columns."""
    splits = held_out_splits(results)
    rows = [["model", "params", "params vs first", "size on disk", "held-out ppl", "ppl vs first"]
            + [cell for split in splits for cell in (f"{split} ppl", f"{split} vs first")] + ["tokens/s"]]
    first = results[0] if results else {"params": 1}
    for result in results:
        size = human_bytes(result.get("disk_bytes"))
        if result.get("format"):
            size += f" ({result['format']})"
        row = [result["name"], f"{result['params'] / 1e6:.1f}M", f"{result['params'] / first['params']:.1%}", size,
               f"{result['perplexity']:.2f}", f"{result['perplexity'] / first['perplexity']:.2f}×"]
        for split in splits:
            row += [f"{result[f'{split}_perplexity']:.2f}",
                    f"{result[f'{split}_perplexity'] / first[f'{split}_perplexity']:.2f}×"]
        rows.append(row + [f"{result['tokens_per_s']:.0f}"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    """Fixed-width text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
