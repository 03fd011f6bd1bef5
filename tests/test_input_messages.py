"""Issue 23: what a user is told about bad input names the file and, where a command-line flag is
involved, the flag — data files that are not UTF-8 or hold only whitespace (the readers
themselves: tests/test_data.py); hints about options; a folder named *.gguf; custom code
(auto_map) of a model; a disk that fills up during export; scores written through slimlm.outputs."""
import errno
import json
import logging
import os
import shutil

import gguf
import pytest
import torch

from slimlm import outputs
from slimlm.cli.arguments import check_model_path
from slimlm.errors import InputError
from slimlm.export import export_gguf
from slimlm.importance.scores import META_FILE, SCORES_FILE, ImportanceScores
from slimlm.models import load_model, load_tokenizer
from slimlm.search import Budget, Candidate, search_candidates
from slimlm.search.budget import fitting
from slimlm.surgery import plan, save_pruned
from tests.cli.helpers import one_line_error, run_cli
from tests.tiny import bpe_tokenizer, random_scores, tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with its word-level tokenizer, as tests/cli's workspace holds one."""
    folder = tmp_path_factory.mktemp("messages") / "teacher"
    tokenizer = word_tokenizer()
    tiny_model("llama", "training", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
               num_hidden_layers=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ (a, c) data (readers: test_data.py)
def test_the_command_line_reports_a_non_utf8_data_file_in_one_line(model_dir, capsys, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("the model was good . caf\u00e9".encode("latin-1"))
    code, _, err = run_cli(capsys, "importance", "--model", model_dir, "--data", path, "--num-samples", 2,
                           "--seq-len", 8, "--out", tmp_path / "scores", "--no-progress")
    assert f"data file {path} is not UTF-8 text (byte 0xe9 at offset 24" in one_line_error(code, err, "importance")
    assert not (tmp_path / "scores").exists()


def test_importance_refuses_whitespace_only_data_naming_the_file(model_dir, capsys, tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"text": "   "}) + "\n" + json.dumps({"text": "\n\n"}) + "\n")
    code, _, err = run_cli(capsys, "importance", "--model", model_dir, "--data", path, "--num-samples", 2,
                           "--seq-len", 8, "--out", tmp_path / "scores", "--no-progress")
    assert f"data file {path} is empty or holds only whitespace" in one_line_error(code, err, "importance")


# ------------------------------------------------------------------ (d) hints name the flags
def test_an_existing_output_hint_names_the_flag_and_the_argument(tmp_path):
    tokenizer = bpe_tokenizer()
    model = tiny_model("llama", vocab_size=320)
    out = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"already exists; pass --overwrite \(overwrite=True in Python\)"):
        export_gguf(model, out, tokenizer=tokenizer)
    (tmp_path / "notes.gguf").write_bytes(b"not ours")
    with pytest.raises(ValueError, match="refusing to replace it even with --overwrite / overwrite=True"):
        export_gguf(model, tmp_path / "notes.gguf", tokenizer=tokenizer, overwrite=True)
    save_pruned(model, tmp_path / "student")
    with pytest.raises(ValueError, match=r"pass --overwrite \(overwrite=True in Python\) to replace it"):
        save_pruned(tiny_model("llama", vocab_size=320, seed=1), tmp_path / "student")


def test_a_budget_below_the_planner_floors_names_the_flags_and_fields():
    with pytest.raises(ValueError) as caught:
        plan(tiny_model("llama"), {"target_params": 0.01})
    message = str(caught.value)
    assert "--hidden-size, --intermediate-size, --num-heads, --num-layers" in message
    assert "min_hidden_size, min_intermediate_size, min_num_attention_heads, min_num_layers in a recipe's target" \
        in message
    assert "lower min_*" not in message


def shape(params: int) -> Candidate:
    return Candidate(64, 96, 4, 2, 4, "least_important", params=params, memory_bytes=None)


def test_a_search_space_that_misses_the_budget_names_the_flags_and_fields():
    with pytest.raises(ValueError) as caught:
        fitting([shape(1000), shape(2000)], Budget(target_params=10), 2000)
    assert ("raise --max-width-prune/--max-depth-prune (search.space.max_width_prune/max_depth_prune in a recipe, "
            "SearchSpace in Python) or lower search.space.min_sizes") in str(caught.value)
    with pytest.raises(ValueError) as caught:
        fitting([shape(1000), shape(2000)], Budget(target_params=1500, tolerance=0.01), 2000)
    assert "raise --tolerance (target.tolerance in a recipe) or lower --multiple-of (search.space.multiple_of)" \
        in str(caught.value)
    with pytest.raises(ValueError) as caught:
        search_candidates(tiny_model("llama"), Budget(target_params=0.8), top_n=1000, top_k=1000)
    assert "lower --top-k (search.top_k in a recipe) or widen the search" in str(caught.value)


def test_scores_of_another_model_say_how_to_recompute_them():
    scores = random_scores(tiny_model("llama"))
    with pytest.raises(ValueError) as caught:
        scores.check_model(tiny_model("llama", seed=1))
    assert str(caught.value).endswith(
        "recompute them with slimlm importance (slimlm.importance.estimate_importance in Python)")


# ------------------------------------------------------------------ (f) a folder named *.gguf
def test_a_folder_named_gguf_is_not_a_gguf_file(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "stud.gguf"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"")
    message = f"model {folder} is a folder, not a GGUF file"
    with pytest.raises(InputError, match=message):
        load_model(folder)
    with pytest.raises(InputError, match=message):
        check_model_path(str(folder))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "plan", "--model", "stud.gguf", "--target-params", "0.5")
    assert "model stud.gguf is a folder, not a GGUF file" in one_line_error(code, err, "plan")


def test_a_model_folder_named_gguf_loads_as_a_folder(model_dir, tmp_path):
    folder = tmp_path / "stud.gguf"
    shutil.copytree(model_dir, folder)
    check_model_path(str(folder))
    assert load_model(folder).config.model_type == "llama"


# ------------------------------------------------------------------ (g) custom code (auto_map)
def custom_code_model(model_dir, folder, *, model_type=None, tokenizer_class=None):
    """``model_dir`` copied with custom code named in config.json (with ``model_type``) or in
    tokenizer_config.json (with ``tokenizer_class``); returns the file its code would write."""
    shutil.copytree(model_dir, folder)
    marker = folder.parent / f"{folder.name}-code-ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n"
                                    "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    if model_type is not None:
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type=model_type,
                      auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_class is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config.update(tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return marker


def test_custom_tokenizer_code_is_refused_naming_tokenizer_config(model_dir, tmp_path):
    folder = tmp_path / "custom"
    marker = custom_code_model(model_dir, folder, tokenizer_class="EvilTokenizer")
    with pytest.raises(InputError) as caught:
        load_tokenizer(folder)
    assert str(caught.value) == (
        f"model {folder}: loading its tokenizer needs the Python code named in tokenizer_config.json's auto_map "
        "(AutoTokenizer → evil.EvilTokenizer); slimlm does not run that code without --trust-remote-code (pass it "
        "only for a model whose code you have read)")
    assert not marker.exists()


def test_custom_model_code_is_refused_naming_config_json(model_dir, tmp_path):
    folder = tmp_path / "custom"
    marker = custom_code_model(model_dir, folder, model_type="evil")
    with pytest.raises(InputError) as caught:
        load_model(folder)
    assert str(caught.value).startswith(
        f"model {folder}: loading its weights needs the Python code named in config.json's auto_map "
        "(AutoConfig → evil.EvilConfig, AutoModelForCausalLM → evil.EvilModel); slimlm does not run that code "
        "without --trust-remote-code")
    assert not marker.exists()


def test_ignored_custom_code_is_one_warning_naming_the_file(model_dir, tmp_path, capsys, caplog):
    folder = tmp_path / "custom"
    marker = custom_code_model(model_dir, folder, model_type="llama")
    with caplog.at_level(logging.WARNING, logger="slimlm.models"):
        code, _, err = run_cli(capsys, "plan", "--model", folder, "--target-params", "0.5")
    assert code == 0, err
    warned = [record.getMessage() for record in caplog.records if record.name == "slimlm.models"]
    assert warned == [
        f"model {folder}: the Python code named in config.json's auto_map (AutoConfig → evil.EvilConfig, "
        "AutoModelForCausalLM → evil.EvilModel) does not run without --trust-remote-code; transformers' built-in "
        "LlamaForCausalLM is used instead"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimlm.models"):
        load_tokenizer(folder)
    assert not [record for record in caplog.records if record.name == "slimlm.models"]
    assert not marker.exists()


def test_a_known_tokenizer_class_ignores_its_auto_map_with_a_warning(model_dir, tmp_path, caplog):
    folder = tmp_path / "custom"
    marker = custom_code_model(model_dir, folder, tokenizer_class="PreTrainedTokenizerFast")
    with caplog.at_level(logging.WARNING, logger="slimlm.models"):
        load_tokenizer(folder)
    warned = [record.getMessage() for record in caplog.records if record.name == "slimlm.models"]
    assert len(warned) == 1 and "tokenizer_config.json's auto_map (AutoTokenizer → evil.EvilTokenizer)" in warned[0]
    assert "--trust-remote-code" in warned[0]
    assert not marker.exists()


# ------------------------------------------------------------------ (h) a full disk during export
@pytest.fixture(scope="module")
def gguf_student(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "student"
    save_pruned(tiny_model("llama", vocab_size=320, tie_word_embeddings=True), folder, tokenizer=bpe_tokenizer(),
                save_dtype="float32")
    return folder


@pytest.mark.parametrize("failure, detail", [
    (OSError("1572864 requested and 1299472 written"),
     "no space left on device (1,299,472 of 1,572,864 bytes written)"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device"),
])
def test_a_full_disk_during_export_names_the_file(gguf_student, tmp_path, monkeypatch, failure, detail):
    out = tmp_path / "student.gguf"
    export_gguf(gguf_student, out)
    previous = out.read_bytes()

    def fail(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError) as caught:
        export_gguf(gguf_student, out, overwrite=True)
    assert not isinstance(caught.value, ValueError)
    assert str(caught.value) == f"writing {out}: {detail}" and caught.value.errno == errno.ENOSPC
    assert out.read_bytes() == previous and sorted(os.listdir(tmp_path)) == [".student.gguf.slimlm-output.json",
                                                                               "student.gguf"]


def test_the_command_line_reports_a_full_disk_as_a_runtime_failure(gguf_student, tmp_path, monkeypatch, capsys):
    def fail(self, *args, **kwargs):
        raise OSError("1572864 requested and 1299472 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    out = tmp_path / "student.gguf"
    code, _, err = run_cli(capsys, "export", "--model", gguf_student, "--gguf", out)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith(f"slimlm export: error: OSError: writing {out}: no space left on device "
                               "(1,299,472 of 1,572,864 bytes written)")
    assert not out.exists()


# ------------------------------------------------------------------ (i) scores through slimlm.outputs
def test_scores_are_saved_through_atomic_output(tmp_path, monkeypatch):
    model = tiny_model("llama")
    folder = tmp_path / "scores"
    random_scores(model, seed=1).save(folder)
    (folder / "stale.txt").write_text("from before")
    used = []
    atomic_output = outputs.atomic_output

    def spy(path, **kwargs):
        used.append((os.fspath(path), kwargs))
        return atomic_output(path, **kwargs)

    monkeypatch.setattr(outputs, "atomic_output", spy)
    scores = random_scores(model, seed=2)
    scores.save(folder)
    assert used == [(os.fspath(folder), {})]
    assert not (folder / "stale.txt").exists()  # the folder was replaced whole
    loaded = ImportanceScores.load(folder, model=model)
    assert all(torch.equal(loaded.scores[key], value) for key, value in scores.scores.items())


def test_a_failed_save_leaves_the_previous_scores_and_no_leftovers(tmp_path, monkeypatch):
    model = tiny_model("llama")
    folder = tmp_path / "scores"
    before = random_scores(model, seed=1)
    before.save(folder)
    files = {name: (folder / name).read_bytes() for name in (SCORES_FILE, META_FILE)}

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        random_scores(model, seed=2).save(folder)
    assert {name: (folder / name).read_bytes() for name in (SCORES_FILE, META_FILE)} == files
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]
    assert not os.path.lexists(outputs.staging_path(folder))
