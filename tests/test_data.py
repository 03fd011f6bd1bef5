"""slimlm.data: readers, packing, masks, seeded sampling and splitting, and the errors."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

from slimlm import data
from slimlm.errors import InputError
from tiny import bpe_tokenizer

WORDS = "the quick brown fox jumps over lazy dog a b c".split()


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory: one id per word, <pad>=0, <eos>=1, <unk>=2."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def ids(words):
    return [WORDS.index(word) + 3 for word in words.split()]


def test_text_files_and_globs_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text("the fox")
    (tmp_path / "a.txt").write_text("a dog")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("lazy b")
    assert data.load_texts(str(tmp_path / "*.txt")) == ["a dog", "the fox"]
    assert data.load_texts(str(tmp_path / "**" / "*.*")) == ["a dog", "the fox", "lazy b"]
    assert data.load_texts([tmp_path / "b.txt", tmp_path / "a.txt"]) == ["the fox", "a dog"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["the dog", "a fox"])) + "\n\n")
    assert data.load_texts(path, text_field="body") == ["the dog", "a fox"]
    with pytest.raises(ValueError, match=r"docs.jsonl:1: no text field 'text' \(has: body, id\)"):
        data.load_texts(path)


@pytest.mark.parametrize("content", ["", "   \n", None])
def test_empty_files_are_errors(tmp_path, content):
    if content is None:
        path = tmp_path / "empty.jsonl"
        path.write_text("\n")
    else:
        path = tmp_path / "empty.txt"
        path.write_text(content)
    with pytest.raises(ValueError, match="empty"):
        data.load_texts(path)


def test_missing_file_and_glob_without_match(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.load_texts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="no files match"):
        data.load_texts(str(tmp_path / "*.nothing"))


def test_parquet(tmp_path):
    path = tmp_path / "docs.parquet"
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow"):
            data.load_texts(path)
        return
    parquet.write_table(pyarrow.table({"text": ["the dog", "a fox"], "n": [1, 2]}), path)
    assert data.load_texts(path) == ["the dog", "a fox"]
    with pytest.raises(ValueError, match="no text field 'body'"):
        data.load_texts(path, text_field="body")


def test_saved_dataset(tmp_path):
    folder = tmp_path / "saved"
    try:
        import datasets
    except ImportError:
        folder.mkdir()
        (folder / "dataset_info.json").write_text("{}")
        with pytest.raises(ValueError, match="needs `datasets`"):
            data.load_texts(folder)
        return
    datasets.Dataset.from_dict({"text": ["the dog", "a fox"]}).save_to_disk(str(folder))
    assert data.load_texts(folder) == ["the dog", "a fox"]


def test_packing_concatenates_with_eos_and_pads_the_last_block(tokenizer):
    blocks = data.tokenize_blocks(["the quick fox", "a dog"], tokenizer, seq_len=4)
    stream = ids("the quick fox") + [1] + ids("a dog") + [1]
    assert blocks.input_ids.tolist() == [stream[:4], stream[4:] + [0]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert blocks.num_tokens == 7


def test_unpacked_blocks_truncate_and_pad(tokenizer):
    blocks = data.tokenize_blocks(["the quick brown fox jumps", "a"], tokenizer, seq_len=3, pack=False, add_eos=False)
    assert blocks.input_ids.tolist() == [ids("the quick brown"), ids("a") + [0, 0]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_seq_len_above_model_limit(tokenizer, tmp_path):
    config = LlamaConfig(max_position_embeddings=16)
    with pytest.raises(ValueError, match=r"seq_len 32 is above the model's limit \(max_position_embeddings = 16\)"):
        data.tokenize_blocks(["the dog"], tokenizer, seq_len=32, model=config)
    (tmp_path / "a.txt").write_text("the dog")
    with pytest.raises(ValueError, match="above the model's limit"):
        data.load_blocks(tmp_path / "a.txt", tokenizer, 32, model=config)
    assert len(data.tokenize_blocks(["the dog"], tokenizer, seq_len=16, model=config)) == 1


def test_texts_that_tokenise_to_nothing(tokenizer):
    with pytest.raises(ValueError, match="no texts"):
        data.tokenize_blocks([], tokenizer, 4)
    with pytest.raises(ValueError, match="tokenised to nothing"):
        data.tokenize_blocks(["", " "], tokenizer, 4, add_eos=False)


@pytest.mark.parametrize("name, content, offset, line", [
    ("cafe.txt", "caf\u00e9 au lait".encode("latin-1"), 3, 1),
    ("docs.jsonl", b'{"text": "the dog"}\n{"text": "caf\xe9"}\n', 33, 2),
])
def test_a_data_file_that_is_not_utf8_is_named_with_the_byte_and_offset(tmp_path, name, content, offset, line):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        data.load_texts(path)
    assert str(caught.value).startswith(f"data file {path} is not UTF-8 text (byte 0xe9 at offset {offset}, "
                                        f"line {line})")
    assert "\n" not in str(caught.value)


def test_a_utf8_bom_is_read_past_in_jsonl_and_text_files(tmp_path):
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"text": "the dog"}\n{"text": "a fox"}\n')
    assert data.load_texts(jsonl) == ["the dog", "a fox"]
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbfthe quick fox")
    assert data.load_texts(text) == ["the quick fox"]


@pytest.mark.parametrize("records", [["", ""], ["   ", "\n\t "], [" ", ""]])
def test_a_jsonl_file_of_blank_documents_is_empty(tmp_path, records):
    path = tmp_path / "blank.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    with pytest.raises(InputError, match=f"data file {path} is empty or holds only whitespace"):
        data.load_texts(path)


def test_whitespace_only_documents_are_left_out_as_empty_ones_are():
    tokenizer = bpe_tokenizer()  # byte-level: whitespace tokenises to tokens of its own
    assert tokenizer(" \n\t ", add_special_tokens=False)["input_ids"]
    expected = data.tokenize_blocks(["the model", "a layer"], tokenizer, seq_len=8)
    blocks = data.tokenize_blocks(["the model", "  \n ", "", "a layer", "\t"], tokenizer, seq_len=8)
    assert torch.equal(blocks.input_ids, expected.input_ids)
    assert torch.equal(blocks.attention_mask, expected.attention_mask)
    unpacked = data.tokenize_blocks(["the model", " \n "], tokenizer, seq_len=8, pack=False)
    assert len(unpacked) == 1
    with pytest.raises(ValueError, match="every text is empty, whitespace only or tokenised to nothing"):
        data.tokenize_blocks(["  ", "\n\n", ""], tokenizer, seq_len=8)


def make_blocks(n, seq_len=3):
    return data.TokenBlocks(torch.arange(n * seq_len).view(n, seq_len), torch.ones(n, seq_len, dtype=torch.long))


def test_sampling_is_seeded_and_distinct():
    blocks = make_blocks(20)
    first = blocks.sample(5, seed=3)
    assert torch.equal(first.input_ids, blocks.sample(5, seed=3).input_ids)
    assert not torch.equal(first.input_ids, blocks.sample(5, seed=4).input_ids)
    assert len(set(first.input_ids[:, 0].tolist())) == 5
    assert len(blocks.sample(50)) == 20


def test_split_is_a_seeded_partition():
    blocks = make_blocks(10)
    train, held = blocks.split(0.3, seed=1)
    assert (len(train), len(held)) == (7, 3)
    rows = sorted(train.input_ids[:, 0].tolist() + held.input_ids[:, 0].tolist())
    assert rows == blocks.input_ids[:, 0].tolist()
    again_train, _ = blocks.split(0.3, seed=1)
    assert torch.equal(train.input_ids, again_train.input_ids)
    assert len(blocks.split(2)[1]) == 2
    for bad in (0.0, 1.0, 0, 10):
        with pytest.raises(ValueError, match="held_out"):
            blocks.split(bad)


def test_batches_cover_every_block_once():
    blocks = make_blocks(7)
    batches = list(blocks.batches(3, shuffle=True, seed=2))
    assert [len(b["input_ids"]) for b in batches] == [3, 3, 1]
    seen = torch.cat([b["input_ids"][:, 0] for b in batches]).sort().values
    assert torch.equal(seen, blocks.input_ids[:, 0])
    assert set(batches[0]) == {"input_ids", "attention_mask"}


def test_load_blocks_end_to_end(tokenizer, tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": " ".join(WORDS[i:])}) for i in range(6)))
    blocks = data.load_blocks(tmp_path / "docs.jsonl", tokenizer, 5, num_samples=4, seed=0)
    assert blocks.input_ids.shape == (4, 5)
    full = data.load_blocks(tmp_path / "docs.jsonl", tokenizer, 5)
    assert full.num_tokens == sum(len(WORDS[i:]) + 1 for i in range(6))
