"""export_gguf: the GGUF file read back by transformers' own GGUF loader, for every exported
family and outtype, against the source model with its matrices rounded the same way."""
from __future__ import annotations

import json
import os
import time

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from slimlm.export import OUTTYPES, export_gguf, interleave_rope_rows
from slimlm.surgery import save_pruned
from tiny import bpe_tokenizer, cast_weights, tiny_model, word_tokenizer

TEXT = "the small model will run fast . the teacher was good"
# What each family's tiny model changes for llama.cpp to run it as transformers does: no
# sliding windows; Qwen3 at head_dim 128, the value transformers' GGUF loader assumes for it
# (it reads no head size from the file for Qwen3).
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"use_sliding_window": False},
    "qwen3": {"use_sliding_window": False, "head_dim": 128},
}
GGML_TYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0}


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


def family_model(model_type: str):
    return tiny_model(model_type, vocab_size=320, **FAMILIES[model_type])


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


def rounded_like_gguf(model, outtype: str):
    """The model with every matrix rounded as ``outtype`` stores it (vectors stay float32)."""
    model = cast_weights(model, torch.float32)
    if outtype == "f32":
        return model
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                data = parameter.numpy()
                parameter.copy_(torch.from_numpy(dequantize(quantize(data, GGML_TYPES[outtype]), GGML_TYPES[outtype])
                                                 .reshape(data.shape).astype(np.float32)))
    return model


def load_gguf(path):
    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()


# Every family's layout at f32, every outtype's rounding on the Llama family (SmolLM2's): the
# rounding does not depend on the family, and each round trip costs ~1-2 s of transformers' loading.
ROUND_TRIPS = [(model_type, "f32") for model_type in sorted(FAMILIES)] + [("llama", t) for t in OUTTYPES if t != "f32"]


@pytest.mark.parametrize("model_type, outtype", ROUND_TRIPS)
def test_transformers_reads_back_the_model_within_the_outtypes_rounding(model_type, outtype, tokenizer, tmp_path):
    model = family_model(model_type)
    input_ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    path = export_gguf(model, tmp_path / f"{model_type}.gguf", outtype=outtype, tokenizer=tokenizer)
    reloaded = load_gguf(path)
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == model.config.tie_word_embeddings
    torch.testing.assert_close(logits(reloaded, input_ids), logits(rounded_like_gguf(model, outtype), input_ids),
                               rtol=1e-4, atol=1e-4)


def test_the_tokenizer_travels_with_the_weights(tokenizer, tmp_path):
    path = export_gguf(family_model("llama"), tmp_path / "llama.gguf", tokenizer=tokenizer)
    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]  # model rows no token uses
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[3] == gguf.TokenType.NORMAL
    assert types[300] == gguf.TokenType.UNUSED
    assert reader.fields["tokenizer.ggml.merges"].contents()  # a BPE vocabulary with merges
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    reloaded = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="llama.gguf")
    assert reloaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert reloaded.eos_token == "<|im_end|>" and reloaded.chat_template == tokenizer.chat_template


def test_a_model_folder_exports_with_its_saved_tokenizer(tokenizer, tmp_path):
    model = family_model("qwen2")
    save_pruned(model, tmp_path / "student", tokenizer=tokenizer)
    path = export_gguf(tmp_path / "student", tmp_path / "student.gguf", outtype="f32")
    input_ids = torch.tensor([tokenizer(TEXT)["input_ids"]])
    torch.testing.assert_close(logits(load_gguf(path), input_ids), logits(model, input_ids), rtol=1e-4, atol=1e-4)


def test_interleaving_pairs_each_heads_halves():
    rows = np.arange(8, dtype=np.float32)[:, None]  # 2 heads of 4: (0 1 | 2 3), (4 5 | 6 7)
    assert interleave_rope_rows(rows, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_an_existing_output_needs_overwrite(tokenizer, tmp_path):
    out = export_gguf(family_model("qwen2"), tmp_path / "model.gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"{out} already exists; pass --overwrite \\(overwrite=True in Python\\)"):
        export_gguf(family_model("llama"), out, tokenizer=tokenizer)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "qwen2"
    export_gguf(family_model("llama"), out, tokenizer=tokenizer, overwrite=True)
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "llama"


@pytest.mark.parametrize("content", [b"not ours", b"GGUF\x03\x00\x00\x00 another tool's model"])
def test_a_file_slimlm_did_not_write_is_never_replaced(tokenizer, tmp_path, content):
    out = tmp_path / "notes.gguf"
    out.write_bytes(content)
    with pytest.raises(ValueError, match="exists and was not written by slimlm; refusing to replace it even with "
                                         "--overwrite / overwrite=True"):
        export_gguf(family_model("llama"), out, tokenizer=tokenizer, overwrite=True)
    assert out.read_bytes() == content


def test_a_failed_export_leaves_nothing_half_written(tokenizer, tmp_path, monkeypatch):
    out = export_gguf(family_model("qwen2"), tmp_path / "model.gguf", tokenizer=tokenizer)
    previous = open(out, "rb").read()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(family_model("llama"), out, tokenizer=tokenizer, overwrite=True)
    assert open(out, "rb").read() == previous and sorted(os.listdir(tmp_path)) == [".model.gguf.slimlm-output.json",
                                                                                   "model.gguf"]


@pytest.mark.parametrize("model_type, overrides, message", [
    ("phi3", {}, "no llama.cpp \\(GGUF\\) layout"),
    ("gemma2", {}, "no llama.cpp \\(GGUF\\) layout"),
    ("qwen2", {"use_sliding_window": True}, "sliding-window attention"),
    ("mistral", {"sliding_window": 5}, "sliding window \\(5 tokens"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope scaling 'linear'"),
])
def test_what_llama_cpp_cannot_run_is_refused(model_type, overrides, message, tokenizer, tmp_path):
    model = tiny_model(model_type, vocab_size=320, **overrides)
    with pytest.raises(ValueError, match=f"cannot export .*\\({model_type}\\) to GGUF: .*{message}"):
        export_gguf(model, tmp_path / "out.gguf", tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


def test_a_folder_without_a_tokenizer_is_refused(tmp_path):
    save_pruned(family_model("llama"), tmp_path / "student")
    with pytest.raises(ValueError, match=f"model {tmp_path / 'student'} has no tokenizer"):
        export_gguf(tmp_path / "student", tmp_path / "student.gguf")
    assert not (tmp_path / "student.gguf").exists()


def test_a_tokenizer_llama_cpp_cannot_rebuild_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a WordLevel model.*byte-level BPE"):
        export_gguf(tiny_model("llama"), tmp_path / "out.gguf", tokenizer=word_tokenizer())
    with pytest.raises(ValueError, match="needs tokenizer="):
        export_gguf(tiny_model("llama"), tmp_path / "out.gguf")


def test_bad_outtype_and_output_inside_the_model_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="outtype 'q4_0' is not one of f32, f16, bf16, q8_0"):
        export_gguf(family_model("llama"), tmp_path / "out.gguf", outtype="q4_0", tokenizer=tokenizer)
    save_pruned(family_model("llama"), tmp_path / "student", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="sits inside the model folder"):
        export_gguf(tmp_path / "student", tmp_path / "student" / "model.gguf")


# The real teacher: ~15 s to load and dequantize, then one export + reload per outtype.
@pytest.mark.slow
def test_smollm2_round_trips_through_transformers_gguf_loader(tmp_path):
    from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path

    teacher = load_model(smollm2_gguf_path())
    tokenizer = load_tokenizer(smollm2_gguf_path())
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    expected = logits(teacher, input_ids)
    results = {}
    for outtype in OUTTYPES:
        start = time.perf_counter()
        path = export_gguf(teacher, tmp_path / f"smollm2-{outtype}.gguf", outtype=outtype, tokenizer=tokenizer)
        seconds = time.perf_counter() - start
        reloaded = load_gguf(path)
        got = logits(reloaded, input_ids)
        results[outtype] = {"max_abs_logit_error": float((got - expected).abs().max()),
                            "argmax_agreement": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
                            "mib": os.path.getsize(path) / 2**20, "export_seconds": seconds}
        if outtype == "f32":
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert AutoTokenizer.from_pretrained(tmp_path, gguf_file=os.path.basename(path))(prompt)["input_ids"] == \
                input_ids[0].tolist()
        assert results[outtype]["argmax_agreement"] >= 0.9, results
        del reloaded
        os.remove(path)
    os.makedirs(".benchmarks", exist_ok=True)
    with open(os.path.join(".benchmarks", "smollm2_gguf.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
