"""What a smaller model gains at inference: teacher and student measured side by side, in one run,
on one device.

    report = speed_report({"teacher": teacher, "student": student}, specs={"teacher": "t/", "student": "s/"})
    print(format_table(speed_rows(report)))

Per model and batch size (default 1 and 8), greedy decoding of a fixed prompt for a fixed number
of tokens with the KV cache (no early stop at EOS, so every model does the same work), timed in
rounds that alternate between the models, medians over the rounds:

- time to first token (TTFT) = the prefill forward over the prompt + the first argmax;
  prefill tokens/s = batch · prompt_tokens / TTFT;
- time per output token (TPOT) = the decode seconds / (new_tokens − 1), one step yields ``batch``
  tokens; decode tokens/s = batch · (new_tokens − 1) / decode seconds;
- memory at ``seq_len`` = prompt_tokens + new_tokens − 1, the length the KV cache holds when the
  run ends: on every device by tensor accounting (the weights' bytes + the bytes of the KV cache
  tensors the model holds then; activations are not counted), and on CUDA also measured
  (``torch.cuda.max_memory_allocated`` over the run: weights, cache and activations);
- parameters, and size on disk for models given a path in ``specs``.

``report["ratios"]`` divides every figure of each model by the first model's (the teacher's):
above 1 is better for tokens/s, below 1 is better for times, memory and size.
"""
from __future__ import annotations

import os
import statistics
import time

import torch

from slimlm.errors import InputError
from slimlm.evaluate import count_params, disk_bytes, human_bytes

# The fixed prompt text (repeated to the prompt length) when a tokenizer is given.
PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the small model and the large model take "
               "turns answering the same question about pruning, distillation and the speed of inference. ")
TIMED_FIELDS = ("ttft_s", "tpot_s", "prefill_tokens_per_s", "decode_tokens_per_s")


def prompt_ids(models: dict, *, prompt_tokens: int, tokenizer=None, seed: int = 0) -> torch.Tensor:
    """(1, prompt_tokens) token ids every model reads: ``PROMPT_TEXT`` encoded and repeated, or,
    without a tokenizer, seeded random ids below the smallest vocabulary."""
    if tokenizer is not None:
        ids = tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
        ids = (ids * (prompt_tokens // max(len(ids), 1) + 1))[:prompt_tokens]
        return torch.tensor([ids])
    vocab = min(model.config.vocab_size for model in models.values())
    return torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))


def _cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a transformers cache holds."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"cannot account the memory of a {type(cache).__name__} KV cache (no .layers)")
    return sum(tensor.nbytes for layer in layers for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(tensor, torch.Tensor))


def _weights_bytes(model) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.nbytes for t in tensors.values())


@torch.inference_mode()
def _greedy_run(model, input_ids: torch.Tensor, new_tokens: int) -> dict:
    """One timed greedy run: prefill (+ first token), then new_tokens − 1 cached decode steps."""
    device = input_ids.device

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = now()
    output = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
    first = now()
    cache = output.past_key_values
    for _ in range(new_tokens - 1):
        output = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
        cache = output.past_key_values
        next_ids = output.logits[:, -1].argmax(-1, keepdim=True)
    end = now()
    run = {"ttft_s": first - start, "tpot_s": (end - first) / (new_tokens - 1), "kv_cache_bytes": _cache_bytes(cache)}
    if device.type == "cuda":
        run["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return run


def speed_report(models: dict, *, specs: dict | None = None, tokenizer=None, device=None, prompt_tokens: int = 128,
                 new_tokens: int = 32, batch_sizes=(1, 8), rounds: int = 3, warmup: int = 1) -> dict:
    """Inference figures of ``models`` ({name: causal LM}, the reference first: teacher, then
    student) side by side, as the module docstring defines them; ``specs`` ({name: folder or
    file}) adds size on disk; ``device`` moves the models there (default: where they are; all
    must be on one device). Returns {"setup": ..., "models": {name: {...,"batch": {b: figures}}},
    "ratios": {name: same layout, each figure ÷ the first model's}}."""
    if not models:
        raise ValueError("speed_report needs at least one model")
    if new_tokens < 2 or prompt_tokens < 1 or rounds < 1 or not batch_sizes:
        raise ValueError(f"speed_report needs new_tokens >= 2, prompt_tokens >= 1, rounds >= 1 and batch sizes "
                         f"(got {new_tokens}, {prompt_tokens}, {rounds}, {batch_sizes})")
    if device is not None:
        for model in models.values():
            model.to(device)
    devices = {next(model.parameters()).device for model in models.values()}
    if len(devices) != 1:
        raise ValueError(f"the models are on different devices ({', '.join(map(str, devices))}); pass device=")
    device = devices.pop()
    seq_len = prompt_tokens + new_tokens - 1
    too_long = [name for name, model in models.items()
                if seq_len > getattr(model.config, "max_position_embeddings", seq_len)]
    if too_long:
        raise InputError(f"prompt_tokens + new_tokens - 1 = {seq_len} exceeds the context of {', '.join(too_long)}")
    prompt = prompt_ids(models, prompt_tokens=prompt_tokens, tokenizer=tokenizer).to(device)
    for model in models.values():
        model.eval()

    runs = {name: {batch: [] for batch in batch_sizes} for name in models}
    for batch in batch_sizes:
        input_ids = prompt.expand(batch, -1).contiguous()
        for round_number in range(warmup + rounds):
            for name, model in models.items():  # alternate, so drifting machine load hits every model alike
                run = _greedy_run(model, input_ids, new_tokens)
                if round_number >= warmup:
                    runs[name][batch].append(run)

    report = {"setup": {"device": str(device), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                        "seq_len": seq_len, "batch_sizes": list(batch_sizes), "rounds": rounds, "warmup": warmup,
                        "memory": ("weights + KV cache tensors at seq_len (tensor accounting, activations excluded)"
                                   + ("; peak_allocated_bytes: torch.cuda.max_memory_allocated over the run"
                                      if device.type == "cuda" else ""))},
              "models": {}}
    for name, model in models.items():
        weights = _weights_bytes(model)
        spec = (specs or {}).get(name)
        entry = {"params": count_params(model), "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                 "weights_bytes": weights,
                 "disk_bytes": disk_bytes(spec) if spec is not None and os.path.exists(os.fspath(spec)) else None,
                 "batch": {}}
        for batch, measured in runs[name].items():
            figures = {field: statistics.median(run[field] for run in measured) for field in ("ttft_s", "tpot_s")}
            figures["prefill_tokens_per_s"] = batch * prompt_tokens / figures["ttft_s"]
            figures["decode_tokens_per_s"] = batch / figures["tpot_s"]
            figures["kv_cache_bytes"] = measured[-1]["kv_cache_bytes"]
            figures["memory_bytes"] = weights + figures["kv_cache_bytes"]
            if "peak_allocated_bytes" in measured[-1]:
                figures["peak_allocated_bytes"] = max(run["peak_allocated_bytes"] for run in measured)
            entry["batch"][batch] = figures
        report["models"][name] = entry
    report["ratios"] = _ratios(report["models"])
    return report


def _ratio(value, reference):
    return value / reference if isinstance(value, (int, float)) and reference else None


def _ratios(entries: dict) -> dict:
    reference = next(iter(entries.values()))
    return {name: {"params": _ratio(entry["params"], reference["params"]),
                   "weights_bytes": _ratio(entry["weights_bytes"], reference["weights_bytes"]),
                   "disk_bytes": _ratio(entry["disk_bytes"], reference["disk_bytes"]),
                   "batch": {batch: {field: _ratio(value, reference["batch"][batch].get(field))
                                     for field, value in figures.items()}
                             for batch, figures in entry["batch"].items()}}
            for name, entry in entries.items()}


def speed_rows(report: dict) -> list[list[str]]:
    """Header + one row per model and batch size for ``slimlm.evaluate.format_table``; the ×
    columns are ratios to the first model."""
    seq_len = report["setup"]["seq_len"]
    rows = [["model", "batch", "prefill tok/s", "×", "decode tok/s", "×", "TTFT ms", "TPOT ms",
             f"memory @{seq_len}", "×", "on disk", "×"]]
    for name, entry in report["models"].items():
        ratios = report["ratios"][name]
        for batch, figures in entry["batch"].items():
            ratio = ratios["batch"][batch]
            rows.append([name, str(batch), f"{figures['prefill_tokens_per_s']:.0f}",
                         f"{ratio['prefill_tokens_per_s']:.2f}", f"{figures['decode_tokens_per_s']:.1f}",
                         f"{ratio['decode_tokens_per_s']:.2f}", f"{figures['ttft_s'] * 1e3:.1f}",
                         f"{figures['tpot_s'] * 1e3:.1f}", human_bytes(figures["memory_bytes"]),
                         f"{ratio['memory_bytes']:.2f}", human_bytes(entry["disk_bytes"]),
                         "-" if ratios["disk_bytes"] is None else f"{ratios['disk_bytes']:.2f}"])
    return rows
