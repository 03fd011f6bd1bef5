"""save_pruned's dtype and tokenizer rules: checkpoints in the source's declared dtype (or the
one asked for), tokenizer files that transformers 4.x and llama.cpp's converter load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from slimlm.models import load_model
from slimlm.surgery import save_pruned
from tiny import cast_weights, tiny_model, word_tokenizer

SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INPUT_IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 60, 12]])


def logits(model, input_ids=INPUT_IDS):
    with torch.no_grad():
        return model(input_ids).logits


def saved_dtypes(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {handle.get_slice(name).get_dtype() for name in handle.keys()}


@pytest.fixture
def bf16_source(tmp_path):
    """A tiny Llama published in bfloat16, loaded the way the CLI trains: in float32."""
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "source")
    loaded = load_model(tmp_path / "source", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    return loaded


@pytest.mark.parametrize("requested, expected", [(None, torch.bfloat16), ("auto", torch.bfloat16),
                                                 ("float32", torch.float32), ("float16", torch.float16),
                                                 ("bfloat16", torch.bfloat16)])
def test_saves_in_the_source_dtype_unless_asked(bf16_source, requested, expected, tmp_path):
    model = bf16_source
    with torch.no_grad():  # fp32 training moved the weights off the bf16 grid
        model.model.layers[0].mlp.down_proj.weight.add_(1e-3)
    expected_logits = logits(cast_weights(model, expected))
    save_pruned(model, tmp_path / "out", save_dtype=requested)
    assert model.dtype == torch.float32  # the model in memory is not cast
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == str(expected).removeprefix("torch.")
    assert saved_dtypes(tmp_path / "out") == {SAFETENSORS_NAMES[expected]}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert reloaded.dtype == expected
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    torch.testing.assert_close(logits(reloaded), expected_logits, rtol=0, atol=0)


def test_a_float32_source_stays_float32(tmp_path):
    model = tiny_model("qwen2")
    save_pruned(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_saving_the_same_model_again_is_recognised_in_its_saved_dtype(bf16_source, tmp_path):
    with torch.no_grad():  # off the bf16 grid: the fp32 model's own fingerprint differs from its checkpoint's
        bf16_source.get_input_embeddings().weight.add_(1e-4)
    save_pruned(bf16_source, tmp_path / "out")
    save_pruned(bf16_source, tmp_path / "out")  # the model the folder holds: nothing to protect


@pytest.mark.parametrize("requested, message", [
    ("int8", r"save dtype: unknown value 'int8' \(known: auto, float32, bfloat16, float16\)$"),
    ("bf16", r"save dtype: unknown value 'bf16' \(known: .*; bf16 is now bfloat16\)$")])
def test_an_unknown_save_dtype_is_refused(tmp_path, requested, message):
    with pytest.raises(ValueError, match=message):
        save_pruned(tiny_model("llama"), tmp_path / "out", save_dtype=requested)
    assert not (tmp_path / "out").exists()


def test_tokenizer_files_load_in_older_readers(tmp_path):
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    save_pruned(tiny_model("llama"), tmp_path / "out", tokenizer=tokenizer)
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    # transformers 4.x and convert_hf_to_gguf.py resolve the class by name; 5.x's TokenizersBackend is unknown there
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(config.get("extra_special_tokens"), list)
    reloaded = PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    text = "the small model will run fast . <tool>"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token == "<eos>" and reloaded.pad_token == "<pad>"
    assert "<tool>" in reloaded.all_special_tokens
