"""Each data source of the corpus as a source of the training mix (``distill.corpus_sources``):
the token shards record which source each token came from, each source's blocks hold its text
only, the mix weighs them (statically or, with the dynamic mix, by the student's gap), and every
way to ask for it wrongly is refused with one line."""
import json
import os
import random

import numpy as np
import pytest
import torch

from slimlm.distill.mixture import BlockRanges, corpus_sources
from slimlm.distill.options import DistillOptions, parse_corpus_weights
from slimlm.errors import InputError
from slimlm.options import OptionError
from slimlm.pipeline import distill as stage
from slimlm.shards import TokenShards, write_shards
from tests.tiny import fit, tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Two registers with no word in common, so a token tells its source.
DOCS_WORDS = "the model layer head neuron prune token data text is of to".split()
BOOKS_WORDS = "we they run fast slow good bad was will be and with".split()


def texts(words, count, seed):
    generator = random.Random(seed)
    return [" ".join(generator.choice(words) for _ in range(generator.randint(5, 30))) + " ." for _ in range(count)]


def write_jsonl(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in items))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    return [write_jsonl(folder / "docs.jsonl", texts(DOCS_WORDS, 60, 1)),
            write_jsonl(folder / "books.part1.jsonl", texts(BOOKS_WORDS, 40, 2))]


def shards_of(sources, tokenizer, out, **options):
    return write_shards(sources, tokenizer, out, log=lambda line: None, **options)


@pytest.fixture(scope="module")
def shards(files, tokenizer, tmp_path_factory):
    return shards_of(files, tokenizer, tmp_path_factory.mktemp("shards") / "train", shard_tokens=100)


def ids_of(words, tokenizer):
    return set(tokenizer.convert_tokens_to_ids(words + ["."])) | {tokenizer.eos_token_id}


def test_the_shards_record_each_sources_tokens_whatever_the_shard_size(files, tokenizer, shards, tmp_path):
    alone = [shards_of([path], tokenizer, tmp_path / str(index)).num_tokens for index, path in enumerate(files)]
    assert shards.num_shards > 3  # runs cut by shard boundaries, merged back
    assert shards.source_ranges() == [(0, 0, alone[0]), (1, alone[0], alone[0] + alone[1])]
    whole = shards_of(files, tokenizer, tmp_path / "whole")
    assert whole.num_shards == 1 and whole.source_ranges() == shards.source_ranges()
    assert shards.source_names() == ["docs", "books"]
    # What each range holds is that source's text.
    (_, _, cut), _ = shards.source_ranges()
    assert set(shards.tokens(0, cut).tolist()) <= ids_of(DOCS_WORDS, tokenizer)
    assert set(shards.tokens(cut, shards.num_tokens).tolist()) <= ids_of(BOOKS_WORDS, tokenizer)


def test_a_resumed_tokenisation_keeps_the_sources_record(files, tokenizer, shards, tmp_path, monkeypatch):
    from slimlm import shards as module

    out = tmp_path / "train"
    calls = {"n": 0}
    close = module._ShardSet._close

    def failing_close(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        close(self)

    monkeypatch.setattr(module._ShardSet, "_close", failing_close)
    with pytest.raises(KeyboardInterrupt):
        shards_of(files, tokenizer, out, shard_tokens=100)
    monkeypatch.setattr(module._ShardSet, "_close", close)
    resumed = shards_of(files, tokenizer, out, shard_tokens=100)
    assert resumed.source_ranges() == shards.source_ranges()


@pytest.mark.parametrize("seq_len", [7, 16])
def test_each_sources_blocks_hold_its_text_only(tokenizer, shards, seq_len):
    blocks = shards.blocks(seq_len)
    sources = corpus_sources(shards, blocks, seq_len)
    assert list(sources) == ["docs", "books"]
    (_, _, cut), (_, _, end) = shards.source_ranges()
    assert len(sources["docs"]) == cut // seq_len
    assert len(sources["books"]) == end // seq_len - -(-cut // seq_len)
    for name, words in (("docs", DOCS_WORDS), ("books", BOOKS_WORDS)):
        for index in range(len(sources[name])):
            assert set(sources[name][index]["input_ids"].tolist()) <= ids_of(words, tokenizer)


def test_block_ranges_index_like_the_listed_indices():
    blocks = list(range(100))
    ranges = [(3, 7), (10, 10), (20, 25), (90, 100)]
    subset = BlockRanges(blocks, ranges)
    listed = [index for start, stop in ranges for index in range(start, stop)]
    assert len(subset) == len(listed) and [subset[i] for i in range(len(subset))] == listed
    with pytest.raises(IndexError):
        subset[len(listed)]


@pytest.fixture(scope="module")
def models(tokenizer):
    return {"teacher": tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0),
            "student": lambda: tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, intermediate_size=32)}


def distill(models, tokenizer, train, out, *, steps=6, lines=None, **options):
    log = lines if lines is not None else []
    return stage.distill_stage(
        models["teacher"], models["student"](), tokenizer, train, str(out),
        DistillOptions(**{"seq_len": 8, "batch_size": 2, "lr": 1e-3, **options}),
        training_args=["--use_cpu", "true", "--max_steps", str(steps), "--save_strategy", "no", "--report_to", "none",
                       "--logging_steps", "1"], disable_tqdm=True, log=log.append)


def test_the_static_weights_decide_which_source_each_batch_comes_from(shards, tokenizer):
    blocks = shards.blocks(8)
    sources = corpus_sources(shards, blocks, 8)
    by_tokens, _ = stage.source_mixture(sources, {}, 0.0, DistillOptions(seq_len=8, batch_size=2, corpus_sources=True),
                                        num_items=400, seed=0)
    share = len(sources["docs"]) / (len(sources["docs"]) + len(sources["books"]))
    assert by_tokens.weights_at(0) == pytest.approx({"corpus/docs": share, "corpus/books": 1 - share})
    options = DistillOptions(seq_len=8, batch_size=2, corpus_sources=True, corpus_weights="docs=0,books=1")
    books_only, _ = stage.source_mixture(sources, {}, 0.0, options, num_items=400, seed=0)
    assert {books_only.source_at(batch) for batch in range(books_only.num_batches)} == {"corpus/books"}
    book_ids = ids_of(BOOKS_WORDS, tokenizer)
    assert all(set(books_only[index]["input_ids"].tolist()) <= book_ids for index in range(0, 400, 7))
    # Beside teacher-written text: the corpus's sources share what the synthetic sources leave.
    synthetic = {"synthetic/general": [blocks[0]] * 10}
    mixed, _ = stage.source_mixture(sources, synthetic, 0.25, options, num_items=400, seed=0)
    assert mixed.weights_at(0) == pytest.approx({"corpus/docs": 0.0, "corpus/books": 0.75, "synthetic/general": 0.25})


def test_the_dynamic_mix_weighs_each_corpus_source(models, tokenizer, shards, tmp_path):
    lines = []
    distill(models, tokenizer, shards, tmp_path / "dynamic", steps=6, lines=lines, corpus_sources=True,
            dynamic_mix=True, mix_every=2, mix_heldout_blocks=2)
    record = json.loads((tmp_path / "dynamic" / "slimlm_distill.json").read_text())
    assert record["inputs"]["corpus_sources"] == "by tokens"
    mixes = [entry for entry in record["log_history"] if "mix/corpus/docs" in entry]
    assert [entry["step"] for entry in mixes] == [0, 2, 4]
    assert all(entry["mix/corpus/docs"] + entry["mix/corpus/books"] == pytest.approx(1.0) for entry in mixes)
    assert mixes[1]["mix/corpus/docs"] != mixes[0]["mix/corpus/docs"]
    assert any(line.startswith("[distill] the corpus's sources: docs ") for line in lines)
    # Another weighting is another run: its checkpoints are not this one's.
    distill(models, tokenizer, shards, tmp_path / "static", steps=2, corpus_sources=True,
            corpus_weights="docs=1,books=3")
    record = json.loads((tmp_path / "static" / "slimlm_distill.json").read_text())
    assert record["inputs"]["corpus_sources"] == "docs=1,books=3" and "dynamic_mix" not in record["inputs"]


def chain_texts(count, seed):
    """Sentences in which each word has one fixed successor: learnable, but slowly."""
    words = DOCS_WORDS + BOOKS_WORDS
    successor = dict(zip(words, random.Random(0).sample(words, len(words))))
    generator = random.Random(seed)
    out = []
    for _ in range(count):
        sentence = [generator.choice(words)]
        for _ in range(15):
            sentence.append(successor[sentence[-1]])
        out.append(" ".join(sentence))
    return out


def test_the_dynamic_mix_moves_weight_to_the_source_the_student_lags_on(models, tokenizer, tmp_path):
    """An easy source (one sentence repeated) beside a hard one (word chains) that the teacher
    was trained on: the student learns the easy one within a few steps, lags on the hard one, and
    the weight moves there from an even start."""
    easy = write_jsonl(tmp_path / "data" / "easy.jsonl", ["the model is small ."] * 200)
    hard = write_jsonl(tmp_path / "data" / "hard.jsonl", chain_texts(200, 5))
    train = shards_of([easy, hard], tokenizer, tmp_path / "train")
    rows = torch.stack([torch.as_tensor(train.tokens(start, start + 16).astype("int64"))
                        for start in range(0, train.num_tokens - 16, 8)])
    teacher = fit(tiny_model("llama", "training", vocab_size=len(tokenizer), seed=1), rows, 120)
    distill({**models, "teacher": teacher}, tokenizer, train, tmp_path / "out", steps=24, lr=1e-2,
            corpus_sources=True, corpus_weights="easy=1,hard=1", dynamic_mix=True, mix_every=6, mix_heldout_blocks=4)
    record = json.loads((tmp_path / "out" / "slimlm_distill.json").read_text())
    mixes = [entry for entry in record["log_history"] if "mix/corpus/hard" in entry]
    assert mixes[0]["mix/corpus/hard"] == 0.5
    assert all(entry["mix_excess/corpus/hard"] > entry["mix_excess/corpus/easy"] for entry in mixes[1:])
    assert all(entry["mix/corpus/hard"] > 0.5 for entry in mixes[1:])


@pytest.mark.parametrize("changes, message", [
    (dict(corpus_weights="docs=1"), "corpus_weights weighs the corpus's sources: set corpus_sources too"),
    (dict(corpus_sources=True, corpus_weights="docs"), "corpus_weights: 'docs' is not NAME=WEIGHT"),
    (dict(corpus_sources=True, corpus_weights="docs=1,docs=2"), "source 'docs' is given twice"),
    (dict(corpus_sources=True, corpus_weights="docs=-1"), "the weight of 'docs' must be a finite number >= 0"),
    (dict(corpus_sources=True, corpus_weights="docs=nan"), "the weight of 'docs' must be a finite number >= 0"),
    (dict(corpus_sources=True, corpus_weights="docs=x"), "the weight of 'docs' is not a number"),
    (dict(corpus_sources=True, corpus_weights="docs=0,books=0"), "every weight is 0"),
])
def test_bad_options_are_refused_with_one_line(changes, message):
    with pytest.raises(OptionError, match=message):
        DistillOptions(**changes)


def test_bad_data_is_refused_before_any_training(models, tokenizer, files, shards, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="corpus_sources needs the training data as token shards"):
        distill(models, tokenizer, ["the model is small ."] * 40, out, corpus_sources=True)
    with pytest.raises(InputError, match=r"corpus_weights must name exactly the corpus's sources \(docs, books\): "
                                         r"unknown novels: missing books"):
        distill(models, tokenizer, shards, out, corpus_sources=True, corpus_weights="docs=1,novels=1")
    # Shards written before the record: refused, not mixed as one source.
    old = tmp_path / "old"
    shards_of(files, tokenizer, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["sources"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="do not record which data source each token came from"):
        distill(models, tokenizer, TokenShards(old), out, corpus_sources=True)
    # Two sources of one name; a source too small for a block.
    twin = write_jsonl(tmp_path / "other" / "docs.jsonl", texts(DOCS_WORDS, 5, 3))
    with pytest.raises(InputError, match="two data sources are named 'docs'"):
        distill(models, tokenizer, shards_of([files[0], twin], tokenizer, tmp_path / "twins"), out,
                corpus_sources=True)
    tiny = write_jsonl(tmp_path / "tiny" / "tiny.jsonl", ["run ."])
    with pytest.raises(InputError, match="data source 'tiny' .* holds no whole block of 8 tokens"):
        distill(models, tokenizer, shards_of([files[0], tiny], tokenizer, tmp_path / "small"), out,
                corpus_sources=True)
    assert not os.path.exists(out)


def test_parse_corpus_weights():
    assert parse_corpus_weights("docs=0.7, books = 0.3") == {"docs": 0.7, "books": 0.3}
    assert np.isclose(sum(parse_corpus_weights("a=1,b=2,c=3").values()), 6)
    with pytest.raises(InputError, match="is not NAME=WEIGHT"):
        parse_corpus_weights("=1")


def test_a_corpus_of_a_hundred_billion_tokens_costs_a_few_numbers_per_source():
    class Shards:  # what corpus_sources reads of TokenShards, at a real run's scale
        path = "huge"

        @staticmethod
        def source_names():
            return ["web", "code"]

        @staticmethod
        def source_ranges():
            return [(0, 0, 6 * 10**10), (1, 6 * 10**10, 10**11 + 5)]

    blocks = range(10**11 // 512)
    sources = corpus_sources(Shards, blocks, 512)
    assert len(sources["web"]) == 6 * 10**10 // 512
    assert len(sources["code"]) == 10**11 // 512 - -(-6 * 10**10 // 512)
    assert sources["code"][0] == -(-6 * 10**10 // 512)
    assert sources["web"][len(sources["web"]) - 1] == 6 * 10**10 // 512 - 1
    assert all(len(source.ranges) == 1 for source in sources.values())
