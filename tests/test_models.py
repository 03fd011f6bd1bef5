"""slimlm.models: loading folders, GGUF files and cached hub ids, never downloading."""
from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from slimlm.models import (as_plain_model, load_model, load_tokenizer, save_dtype, smollm2_gguf_path,
                           source_dtype)


@pytest.fixture(scope="module")
def smollm2():
    return load_model(smollm2_gguf_path())


def test_smollm2_gguf_path_points_at_the_packaged_file():
    path = smollm2_gguf_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.getsize(path) > 50_000_000


# Loading and dequantizing the 135M GGUF takes ~15-25 s on the 2-core machines: slow-marked.
@pytest.mark.slow
def test_gguf_model_becomes_an_ordinary_model_that_round_trips(smollm2, tmp_path):
    model = smollm2
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config") and not model.is_quantized
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.lm_head.weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path / "plain")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    input_ids = torch.tensor([[1, 504, 3458, 314, 4649, 28, 253, 3737]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_gguf_tokenizer_matches_the_model(smollm2):
    tokenizer = load_tokenizer(smollm2_gguf_path())
    ids = tokenizer("The capital of France is")["input_ids"]
    assert len(ids) > 2 and max(ids) < smollm2.config.vocab_size
    assert tokenizer.decode(ids).strip().endswith("The capital of France is")


def test_load_model_from_folder_with_dtype(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    model = load_model(tmp_path / "tiny", dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert as_plain_model(model) is model  # not GGUF: unchanged


@pytest.mark.parametrize("spec, message", [
    ("slimlm-tests/surely-not-in-the-cache", "not in the local Hugging Face cache"),
    ("./no/such/folder", "neither a model folder"),
    ("missing.gguf", "does not exist"),
])
def test_unresolvable_specs_fail_clearly(spec, message):
    with pytest.raises(FileNotFoundError, match=message):
        load_model(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_model(tmp_path)


def test_save_dtype_follows_the_source_unless_asked():
    config = LlamaConfig(dtype="bfloat16")
    assert save_dtype(config) == save_dtype(config, "auto") == torch.bfloat16
    assert save_dtype(config, "float32") == save_dtype(config, "torch.float32") == save_dtype(config, torch.float32) \
        == torch.float32
    assert save_dtype(config, "float16") == torch.float16
    assert source_dtype(LlamaConfig()) == torch.float32  # nothing declared: transformers' default
    with pytest.raises(ValueError, match=r"^save dtype: unknown value 'int8' "
                                         r"\(known: auto, float32, bfloat16, float16\)$"):
        save_dtype(config, "int8")
    # The short names slimlm took before are refused, naming the one to write instead.
    for old, new in (("fp32", "float32"), ("f32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16"),
                     ("f16", "float16")):
        with pytest.raises(ValueError, match=rf"^save dtype: unknown value '{old}' \(known: auto, float32, bfloat16, "
                                             rf"float16; {old} is now {new}\)$"):
            save_dtype(config, old)


def test_resolve_dtype_takes_the_dtype_tables_names():
    from slimlm.errors import InputError
    from slimlm.models import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(InputError, match=r"^dtype: unknown value 'bf16' \(known: auto, float32, bfloat16, float16; "
                                         r"bf16 is now bfloat16\)$"):
        resolve_dtype("bf16", "cpu")


def test_load_model_records_the_declared_dtype_whatever_it_runs_in(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=1, vocab_size=64)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_model(tmp_path / "bf16", dtype=torch.float32)
    assert model.dtype == torch.float32 and model.config.dtype == torch.float32
    assert source_dtype(model) == save_dtype(model) == torch.bfloat16


def test_a_quantized_gguf_declares_bfloat16():
    """SmolLM2's GGUF is Q4_1/Q8_0 (its file keeps no source dtype): saved as bfloat16, its release dtype."""
    from slimlm.models import _gguf_weights_dtype

    assert _gguf_weights_dtype(smollm2_gguf_path()) == torch.bfloat16


def test_cast_checkpoint_rewrites_every_shard_and_the_index(tmp_path):
    import json

    from slimlm.models import cast_checkpoint

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="10KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    cast_checkpoint(tmp_path / "ckpt", "float16")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert reloaded.dtype == torch.float16
    assert index["metadata"]["total_size"] == sum(p.nbytes for p in reloaded.parameters())
    for name, parameter in model.named_parameters():
        assert torch.equal(reloaded.get_parameter(name), parameter.half()), name
    with pytest.raises(ValueError, match=r"save dtype: unknown value 'auto' \(known: float32, bfloat16, float16\)"):
        cast_checkpoint(tmp_path / "ckpt", "auto")
