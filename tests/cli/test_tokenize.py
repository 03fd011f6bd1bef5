"""``slimlm tokenize``: token shards from the command line, their checks and its one-line errors."""
import os

import pytest

from slimlm.shards import TokenShards

from .helpers import one_line_error, run_cli


def tokenize(capsys, workspace, out, *flags):
    return run_cli(capsys, "tokenize", "--tokenizer", workspace / "teacher", "--data",
                   str(workspace / "data" / "*.txt"), "--out", out, "--no-progress", *flags)


def test_tokenize_writes_shards_the_tokenizer_reads_back(workspace, capsys, tmp_path):
    from slimlm.data import load_texts
    from slimlm.models import load_tokenizer

    out = tmp_path / "shards"
    code, stdout, err = tokenize(capsys, workspace, out, "--shard-tokens", 200, "--num-proc", 2)
    assert code == 0, err
    shards = TokenShards(out)
    assert f"{shards.num_tokens:,} tokens" in stdout and shards.num_shards > 1
    tokenizer = load_tokenizer(workspace / "teacher")
    texts = load_texts(str(workspace / "data" / "*.txt"))
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [1]]
    assert shards.tokens(0, shards.num_tokens).tolist() == expected
    shards.check(tokenizer=tokenizer, sources=[str(workspace / "data" / "*.txt")])
    code, _, err = tokenize(capsys, workspace, out)
    assert "already exists; pass --overwrite" in one_line_error(code, err, "tokenize")
    code, stdout, err = tokenize(capsys, workspace, out, "--shard-tokens", 200, "--overwrite")
    assert code == 0 and "already holds these shards" in stdout, err


@pytest.mark.parametrize("change, message", [
    (["--data", "nope/*.txt"], "data nope/*.txt does not exist"),
    (["--data", "missing.txt"], "data missing.txt does not exist"),
    (["--tokenizer", "missing.gguf"], "model missing.gguf does not exist"),
    (["--out", "data"], "output data contains the data"),
    (["--out", "data/train0.txt"], "output data/train0.txt is the data"),
    (["--data", "{tmp}/blank.txt"], "blank.txt is empty or holds only whitespace"),
    (["--shard-tokens", "0"], "--shard-tokens must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(workspace, capsys, monkeypatch, tmp_path, change, message):
    monkeypatch.chdir(workspace)
    (tmp_path / "blank.txt").write_text(" \n\t")
    argv = {"--tokenizer": "teacher", "--data": "data/*.txt", "--out": str(tmp_path / "never")}
    argv.update({flag: value.format(tmp=tmp_path) for flag, value in zip(change[::2], change[1::2])})
    before = sorted(os.listdir(workspace))
    code, _, err = run_cli(capsys, "tokenize", *[item for pair in argv.items() for item in pair], "--no-progress")
    assert message in one_line_error(code, err, "tokenize")
    assert sorted(os.listdir(workspace)) == before and os.listdir(tmp_path) == ["blank.txt"]


def test_a_hub_source_needs_datasets(workspace, capsys, tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        code, _, err = run_cli(capsys, "tokenize", "--tokenizer", workspace / "teacher", "--data", "hub:org/corpus",
                               "--out", tmp_path / "shards")
        assert "needs the `datasets` package" in one_line_error(code, err, "tokenize")
        assert os.listdir(tmp_path) == []
    else:
        pytest.skip("datasets is installed: a hub id would be streamed from the network")


def test_help_has_examples(capsys):
    from slimlm import cli

    with pytest.raises(SystemExit):
        cli.main(["tokenize", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "slimlm tokenize" in out and "--num-proc" in out
