"""Token shards as ``--data`` of every command that reads training data (importance, prune's
reconstruction, eval, search, generate's prompts): each reads only the blocks or documents it
uses, never the texts; the blocks equal the texts' (``tokenize_blocks(pack=True)``), so the
figures match the text path's; shards of another tokenizer are refused with one line."""
import json

import pytest
import torch

from slimlm import estimate_importance, load_model, load_tokenizer
from slimlm.data import load_texts, tokenize_blocks
from slimlm.importance import ImportanceScores
from slimlm.shards import ShardBlocks, TokenShards, write_shards
from tests.tiny import bpe_tokenizer

from .helpers import one_line_error, run_cli, scores_dir, sentences


@pytest.fixture(scope="module")
def shards(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard-data") / "shards"
    write_shards(str(workspace / "data" / "*.txt"), load_tokenizer(workspace / "teacher"), out, log=lambda line: None)
    return out


@pytest.fixture(scope="module")
def other_shards(workspace, tmp_path_factory):
    """The same texts tokenised by another tokenizer than the teacher's."""
    out = tmp_path_factory.mktemp("shard-data-bpe") / "shards"
    write_shards(str(workspace / "data" / "*.txt"), bpe_tokenizer(), out, log=lambda line: None)
    return out


def watch_reads(monkeypatch) -> dict:
    """From now on: the shard blocks and documents read, by index; reading the texts fails the test."""
    def no_texts(*args, **kwargs):
        pytest.fail("the texts were read, not the token shards")

    monkeypatch.setattr("slimlm.data.load_texts", no_texts)
    monkeypatch.setattr("slimlm.data.tokenize_blocks", no_texts)
    read = {"blocks": [], "documents": []}
    block_ids, document = ShardBlocks.ids, TokenShards.document

    def watched_ids(self, index):
        read["blocks"].append(index)
        return block_ids(self, index)

    def watched_document(self, index):
        read["documents"].append(index)
        return document(self, index)

    monkeypatch.setattr(ShardBlocks, "ids", watched_ids)
    monkeypatch.setattr(TokenShards, "document", watched_document)
    return read


def text_blocks(workspace, seq_len):
    tokenizer = load_tokenizer(workspace / "teacher")
    return tokenize_blocks(load_texts(str(workspace / "data" / "*.txt")), tokenizer, seq_len, pack=True)


def test_the_shards_are_the_texts_packed_blocks(workspace, shards):
    blocks = TokenShards(shards).blocks(16, pad_last=True)
    expected = text_blocks(workspace, 16)
    assert len(blocks) == len(expected) > 8
    every = blocks.select(range(len(blocks)))
    assert torch.equal(every.input_ids, expected.input_ids)
    assert torch.equal(every.attention_mask, expected.attention_mask)


def test_importance_scores_the_calibration_blocks_drawn_from_the_shards(workspace, shards, capsys, tmp_path,
                                                                        monkeypatch):
    read = watch_reads(monkeypatch)
    out = tmp_path / "scores"
    code, _, err = run_cli(capsys, "importance", "--model", workspace / "teacher", "--data", shards,
                           "--num-samples", 8, "--seq-len", 16, "--depth", "block_influence", "--out", out,
                           "--no-progress")
    assert code == 0, err
    assert len(read["blocks"]) == len(set(read["blocks"])) == 8  # only the calibration blocks
    monkeypatch.undo()
    calibration = TokenShards(shards).sample_blocks(8, 16, 0, pad_last=True)
    teacher = load_model(workspace / "teacher", dtype=torch.float32, device="cpu")
    reference = estimate_importance(teacher, calibration.sample(8, 0), metrics=("activation",),
                                    depth=("block_influence",), progress=False)
    saved = ImportanceScores.load(out, model=teacher)
    assert saved.meta["num_tokens"] == calibration.num_tokens
    assert sorted(saved.scores) == sorted(reference.scores)
    for key, expected in reference.scores.items():
        torch.testing.assert_close(saved.scores[key], expected, rtol=1e-5, atol=1e-6, msg=key)


def test_prune_reconstructs_on_the_first_blocks_of_the_shards(workspace, shards, capsys, tmp_path, monkeypatch):
    from slimlm.surgery import reconstruction_stats

    scores = scores_dir(workspace, capsys)
    teacher = load_model(workspace / "teacher", dtype=torch.float32, device="cpu")
    expected = reconstruction_stats(teacher, text_blocks(workspace, 16).select(range(3)))
    read = watch_reads(monkeypatch)
    out = tmp_path / "pruned"
    code, printed, err = run_cli(capsys, "prune", "--model", workspace / "teacher", "--scores", scores,
                                 "--target-params", 0.5, "--data", shards, "--seq-len", 16, "--num-samples", 3,
                                 "--out", out)
    assert code == 0, err
    assert read["blocks"] == [0, 1, 2]
    assert f"input statistics of {expected.tokens:,} tokens" in printed
    record = json.loads((out / "slimlm_prune.json").read_text())["reconstruct"]
    assert (record["tokens"], record["calibration"]) == (expected.tokens, expected.digest)


def test_eval_on_the_shards_gives_the_texts_perplexity(workspace, shards, capsys, tmp_path, monkeypatch):
    common = ["eval", "--model", workspace / "teacher", "--seq-len", 16, "--max-blocks", 4, "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--data", str(workspace / "data" / "*.txt"), "--json",
                           tmp_path / "texts.json")
    assert code == 0, err
    read = watch_reads(monkeypatch)
    code, _, err = run_cli(capsys, *common, "--data", shards, "--json", tmp_path / "shards.json")
    assert code == 0, err
    assert read["blocks"] == [0, 1, 2, 3]
    from_texts, from_shards = (json.loads((tmp_path / name).read_text())[0] for name in ("texts.json", "shards.json"))
    assert from_shards["perplexity"] == pytest.approx(from_texts["perplexity"], rel=1e-5)


def test_search_uses_every_block_of_the_shards(workspace, shards, capsys, tmp_path, monkeypatch):
    scores = scores_dir(workspace, capsys)
    read = watch_reads(monkeypatch)
    out = tmp_path / "search"
    code, _, err = run_cli(capsys, "search", "--model", workspace / "teacher", "--scores", scores, "--data", shards,
                           "--target-params", 0.6, "--top-n", 2, "--top-k", 0, "--seq-len", 16, "--batch-size", 4,
                           "--held-out", 4, "--out", out, "--no-progress")
    assert code == 0, err
    assert sorted(read["blocks"]) == list(range(len(TokenShards(shards).blocks(16, pad_last=True))))
    assert len(json.loads((out / "search.json").read_text())["candidates"]) == 2


def test_generate_cuts_its_prompts_from_the_shards_documents(workspace, shards, capsys, tmp_path, monkeypatch):
    read = watch_reads(monkeypatch)
    out = tmp_path / "synthetic.jsonl"
    code, _, err = run_cli(capsys, "generate", "--no-filters", "--teacher", workspace / "teacher", "--from-data", shards,
                           "--num-prompts", 2, "--max-new-tokens", 3, "--out", out, "--no-progress")
    assert code == 0, err
    assert read["documents"] == [0, 1]  # one document at a time, until there are enough prompts
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # Each document is a file (train0.txt, train1.txt); its prompt is its first sentence.
    assert sorted(record["prompt"] for record in records) == sorted(sentences(12, index)[0] for index in range(2))


def test_distill_mixes_each_data_source_of_the_shards(workspace, shards, capsys, tmp_path):
    from .helpers import pruned_dir

    out = tmp_path / "distilled"
    common = ["distill", "--teacher", workspace / "teacher", "--student", pruned_dir(workspace, capsys), "--data",
              shards, "--seq-len", 16, "--batch-size", 2, "--max_steps", 4, "--save_strategy", "no", "--no-progress"]
    code, stdout, err = run_cli(capsys, *common, "--corpus-sources", "--corpus-weights",
                                "train0=1,train1=1,train2=2,train3=0", "--dynamic-mix", "--mix-every", 2,
                                "--mix-heldout-blocks", 1, "--out", out)
    assert code == 0, err
    assert "[distill] the corpus's sources: train0 " in stdout
    record = json.loads((out / "slimlm_distill.json").read_text())
    assert record["inputs"]["corpus_sources"] == "train0=1,train1=1,train2=2,train3=0"
    mixes = [entry for entry in record["log_history"] if "mix/corpus/train0" in entry]
    assert [entry["step"] for entry in mixes] == [0, 2]
    assert [mixes[0][f"mix/corpus/train{index}"] for index in range(4)] == [0.25, 0.25, 0.5, 0.0]
    for argv, message in (
            (["--corpus-weights", "train0=1"],
             "--corpus-weights weighs the corpus's sources: set --corpus-sources too"),
            (["--corpus-sources", "--corpus-weights", "train0=-1"], "the weight of 'train0' must be a finite number"),
            (["--corpus-sources", "--corpus-weights", "train0=1,other=1"],
             "corpus_weights must name exactly the corpus's sources (train0, train1, train2, train3): unknown other: "
             "missing train1, train2, train3")):
        code, _, err = run_cli(capsys, *common, *argv, "--out", tmp_path / "refused")
        assert message in one_line_error(code, err, "distill")
    code, _, err = run_cli(capsys, *common[:6], workspace / "heldout.txt", *common[7:], "--corpus-sources",
                           "--out", tmp_path / "refused")
    assert "corpus_sources needs the training data as token shards" in one_line_error(code, err, "distill")
    assert not (tmp_path / "refused").exists()


def test_a_seq_len_above_the_models_limit_is_refused(workspace, shards, capsys):
    code, _, err = run_cli(capsys, "eval", "--model", workspace / "teacher", "--data", shards, "--seq-len", 256)
    assert "seq_len 256 is above the model's limit" in one_line_error(code, err, "eval")


@pytest.mark.parametrize("command", ["importance", "prune", "eval", "search", "generate"])
def test_shards_of_another_tokenizer_are_refused_with_one_line(workspace, other_shards, capsys, tmp_path, command):
    teacher, scores, out = workspace / "teacher", scores_dir(workspace, capsys), tmp_path / "out"
    argv = {
        "importance": ["--model", teacher, "--data", other_shards, "--seq-len", 16, "--out", out],
        "prune": ["--model", teacher, "--drop-layers", 1, "--data", other_shards, "--seq-len", 16, "--out", out],
        "eval": ["--model", teacher, "--data", other_shards, "--seq-len", 16, "--json", out],
        "search": ["--model", teacher, "--scores", scores, "--data", other_shards, "--target-params", 0.6,
                   "--seq-len", 16, "--out", out],
        "generate": ["--teacher", teacher, "--from-data", other_shards, "--out", out],
    }[command]
    code, _, err = run_cli(capsys, command, *argv, "--no-progress")
    assert "made by another tokenizer" in one_line_error(code, err, command)
    assert not out.exists()
