"""``slimlm export``: a model folder as a GGUF file that transformers' own GGUF loader reads back
with the same logits; bad input (an existing file, a path in the model folder, no tokenizer, a
name without .gguf) exits 2 with one line and writes nothing."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.surgery import save_pruned
from tests.tiny import bpe_tokenizer, tiny_model

from .helpers import one_line_error, run_cli


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Llama (SmolLM2's family) saved with a byte-level BPE tokenizer, as slimlm saves one."""
    folder = tmp_path_factory.mktemp("export") / "student"
    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", vocab_size=320, tie_word_embeddings=True)
    save_pruned(model, folder, tokenizer=tokenizer, save_dtype="float32")
    return folder


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


@pytest.mark.parametrize("outtype, tolerance", [("f32", 1e-4), ("f16", 2e-2)])
def test_export_writes_a_gguf_transformers_reads_back(student, capsys, tmp_path, outtype, tolerance):
    out = tmp_path / f"student-{outtype}.gguf"
    code, stdout, err = run_cli(capsys, "export", "--model", student, "--gguf", out, "--outtype", outtype)
    assert code == 0, err
    assert f"GGUF ({outtype}) written to {out}" in stdout
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    source = AutoModelForCausalLM.from_pretrained(student).eval()
    input_ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    torch.testing.assert_close(logits(reloaded, input_ids), logits(source, input_ids), rtol=tolerance, atol=tolerance)


def test_an_existing_gguf_needs_overwrite(student, capsys, tmp_path):
    out = tmp_path / "student.gguf"
    assert run_cli(capsys, "export", "--model", student, "--gguf", out)[0] == 0
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "export", "--model", student, "--gguf", out, "--outtype", "q8_0")
    assert "already exists; pass --overwrite" in one_line_error(code, err, "export")
    assert out.read_bytes() == before
    code, _, err = run_cli(capsys, "export", "--model", student, "--gguf", out, "--outtype", "q8_0", "--overwrite")
    assert code == 0, err
    assert out.read_bytes() != before


@pytest.mark.parametrize("case", ["inside the model", "no tokenizer", "not .gguf", "missing model", "a folder"])
def test_bad_export_input_is_one_line_and_writes_nothing(student, capsys, tmp_path, case):
    import shutil

    model, out = student, tmp_path / "out.gguf"
    if case == "inside the model":
        out = student / "student.gguf"
    elif case == "no tokenizer":
        model = tmp_path / "bare"
        shutil.copytree(student, model)
        for name in os.listdir(model):
            if name.startswith("tokenizer") or name in ("special_tokens_map.json", "chat_template.jinja"):
                os.remove(model / name)
    elif case == "not .gguf":
        out = tmp_path / "student.bin"
    elif case == "missing model":
        model = tmp_path / "absent"
    elif case == "a folder":
        out = tmp_path / "folder.gguf"
        out.mkdir()
    before = sorted(os.listdir(student))
    code, _, err = run_cli(capsys, "export", "--model", model, "--gguf", out)
    line = one_line_error(code, err, "export")
    expected = {"inside the model": "is inside the model", "no tokenizer": "has no tokenizer", "not .gguf": "must end in .gguf",
                "missing model": "does not exist", "a folder": "is a folder"}[case]
    assert expected in line and (str(model) in line or str(out) in line), line
    assert sorted(os.listdir(student)) == before
    assert case == "a folder" or not out.exists()


def test_a_file_that_is_not_gguf_is_never_replaced(student, capsys, tmp_path):
    out = tmp_path / "notes.gguf"
    out.write_text("my notes")
    code, _, err = run_cli(capsys, "export", "--model", student, "--gguf", out, "--overwrite")
    assert "was not written by slimlm" in one_line_error(code, err, "export")
    assert out.read_text() == "my notes"
