"""Tiny models, tokenizers and data built from configs, so tests download nothing: one
``tiny_model(model_type)`` factory over the architecture registry for every test folder."""
from __future__ import annotations

import copy
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from slimlm.architectures import supported_model_types
from slimlm.fingerprint import model_fingerprint
from slimlm.importance.scores import ImportanceScores

WORDS = (
    "the a model small large teacher student layer head neuron prune distill text data token "
    "is was will be of to and in on with for it this that we they run fast slow good bad"
).split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS with <pad>=0, <eos>=1, <unk>=2."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word in WORDS + [".", ",", "!", "?"]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return tokenizer


BPE_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def bpe_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style, as SmolLM2's) trained on WORDS, with merges, three
    special tokens (ids 0-2: <|endoftext|> = unk/pad, <|im_start|> = bos, <|im_end|> = eos) and a
    chat template: ``vocab_size`` tokens, so a tiny model needs at least that many rows."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(WORDS)] * 4 + [f"{a} {b}." for a in WORDS for b in WORDS[:8]], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", bos_token="<|im_start|>", eos_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Per family: what its tiny model needs to exercise the family's quirks (sliding windows
# shorter than the test sequences, layer types that differ per layer, Gemma's scalars and
# soft-caps, tied embeddings as in SmolLM2 and Qwen3's small sizes).
TINY_CONFIGS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "qwen2": dict(model_type="qwen2", use_sliding_window=True, sliding_window=5, max_window_layers=2),
    "qwen3": dict(model_type="qwen3", use_sliding_window=True, sliding_window=5, max_window_layers=2,
                  tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", sliding_window=5),
    "gemma2": dict(model_type="gemma2", sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(model_type="gemma3_text", sliding_window=5, query_pre_attn_scalar=16,
                        sliding_window_pattern=2, final_logit_softcapping=30.0),
}
ARCHITECTURES = supported_model_types()

# Sizes and weight noise per use. All use GQA: 4 query heads in 2 KV groups.
PRESETS = {
    # Every axis can shrink (surgery); norms randomised so a norm sliced at the wrong channels shows.
    "surgery": dict(config=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=16, num_hidden_layers=4, vocab_size=128, max_position_embeddings=64,
                                initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                    norm_noise=0.2, bias_noise=0.0),
    # Untied heads, norms and biases spread so that every weight family takes part in the scores.
    "scoring": dict(config=dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                                tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=1),
                    norm_noise=0.5, bias_noise=0.1),
    # Distillation and the CLI: a SmolLM2-like tied Llama, weights as initialised.
    "training": dict(config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None),
                     norm_noise=0.0, bias_noise=0.0),
}


def tiny_config(model_type: str, preset: str = "surgery", **overrides):
    """The config of ``tiny_model``: the family's settings, then the preset's, then ``overrides``."""
    return AutoConfig.for_model(**{**TINY_CONFIGS[model_type], **PRESETS[preset]["config"], **overrides})


def tiny_model(model_type: str, preset: str = "surgery", seed: int = 0, **overrides):
    """A tiny random-weight model of a registered ``model_type`` (nothing downloaded), in eval
    mode with eager attention, sized by ``preset`` (``PRESETS``) and ``overrides`` (config fields)."""
    config = tiny_config(model_type, preset, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    norm_noise, bias_noise = PRESETS[preset]["norm_noise"], PRESETS[preset]["bias_noise"]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if norm_noise and parameter.dim() == 1 and "norm" in name:
                parameter.add_(torch.randn_like(parameter) * norm_noise)
            elif bias_noise and name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * bias_noise)
    return model


def cast_weights(model, dtype):
    """A copy of ``model`` whose weights are in ``dtype``, as loading its checkpoint saved in that
    dtype gives it (``Module.to`` would cast the rotary frequencies too, which transformers keeps
    in float32)."""
    model = copy.deepcopy(model)
    for parameter in model.parameters():
        parameter.data = parameter.data.to(dtype)
    return model


def calibration(batch: int = 5, seq: int = 11, seed: int = 1, pad_from: dict[int, int] | None = None,
                vocab_size: int = PRESETS["scoring"]["config"]["vocab_size"]):
    """Random token ids with right padding: sample b is real up to ``pad_from[b]``."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, start in (pad_from or {}).items():
        mask[row, start:] = 0
        input_ids[row, start:] = 0
    return input_ids, mask


def random_scores(model, seed: int = 1) -> ImportanceScores:
    """Random scores on every axis, fingerprinted for ``model``."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    layers = config.num_hidden_layers

    def draw(*shape):
        return torch.rand(*shape, generator=generator)

    return ImportanceScores(
        scores={
            "magnitude.head": draw(layers, config.num_attention_heads),
            "magnitude.kv_group": draw(layers, config.num_key_value_heads),
            "magnitude.neuron": draw(layers, config.intermediate_size),
            "magnitude.hidden": draw(config.hidden_size),
            "block_influence.layer": draw(layers),
        },
        meta={"fingerprint": model_fingerprint(model), "model_name": f"tiny-{config.model_type}"},
    )


def snapshot(model) -> tuple[dict, dict]:
    """Copies of the weights and config, to prove a failed call left the model untouched."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config.to_dict())


def assert_untouched(model, before) -> None:
    weights, config = before
    now = model.state_dict()
    assert now.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(now[key], value), key
    assert model.config.to_dict() == config


def fit(model, rows: torch.Tensor, steps: int, *, lr: float = 1e-2, batch: int = 16, seed: int = 0):
    """``model`` trained in place on random batches of ``rows`` (token ids) with Adam; returned in eval mode."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        chosen = rows[torch.randint(0, len(rows), (batch,), generator=generator)]
        optimizer.zero_grad()
        model(input_ids=chosen, labels=chosen).loss.backward()
        optimizer.step()
    return model.eval()


def token_dataset(vocab_size: int, num: int, seq: int, seed: int, max_pad: int = 3) -> list[dict]:
    """Random training examples (input_ids, attention_mask, labels = ids with -100 on padding),
    each right-padded with 0..max_pad pad tokens (id 0)."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(num):
        ids = torch.randint(3, vocab_size, (seq,), generator=gen)
        mask = torch.ones(seq, dtype=torch.long)
        pad = int(torch.randint(0, max_pad + 1, (), generator=gen))
        if pad:
            ids[-pad:] = 0
            mask[-pad:] = 0
        items.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return items


def exit_distributed() -> None:
    """End a distributed test worker whose results are written: every rank finishes before any
    tears down, then the process exits without interpreter teardown, where a still-joinable
    gloo/accelerate thread aborts it now and then (as ``slimlm.cli.entry`` does)."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_cached_targets_are_live(teacher, data, k: int, rows_left_out) -> None:
    """Every top-k cache of a synthetic dataset ``data`` holds its records' tokens, and each cached
    id carries the live ``teacher``'s log-prob of it (to the codec's 6-bit precision), the live top
    ``k`` (up to near-ties of a random tiny model); ``rows_left_out(record)``: the rows at a
    sequence's end that are never targets."""
    from slimlm.distill.topk_cache import load_teacher_topk

    for source, path in data.caches.items():
        cache = load_teacher_topk(path)
        records = [r for r in data.records if r["source"] == source]
        assert cache.num_sequences == len(records)
        for number, record in enumerate(records):
            stored = cache.sequence(number)
            assert stored["input_ids"].tolist() == record["ids"]
            with torch.no_grad():
                live = torch.log_softmax(teacher(stored["input_ids"][None]).logits[0].float(), dim=-1)
            rows = len(record["ids"]) - rows_left_out(record)
            cached = stored["topk_logprobs"][:rows]
            assert (cached - live[:rows].gather(1, stored["topk_indices"][:rows])).abs().max() < 0.05
            assert (live[:rows].topk(k).values[:, -1] - cached[:, -1]).abs().max() < 0.05
