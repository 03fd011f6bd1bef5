"""slimlm.shards: token shards written in constant memory and read memory-mapped — the exact ids,
the manifest, staleness, resume, damage, seeded sampling and the distributed sampler."""
import json
import os
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from slimlm import data, outputs, shards
from slimlm.errors import InputError
from slimlm.shards import BlockSampler, Permutation, TokenizeOptions, TokenShards, write_shards
from tiny import WORDS, bpe_tokenizer


def quiet(*_):
    pass


def documents(count, seed=0, blank_every=7):
    generator = random.Random(seed)
    texts = [" ".join(generator.choice(WORDS) for _ in range(generator.randint(1, 30))) + "." for _ in range(count)]
    for index in range(0, count, blank_every):
        texts[index] = " \n "
    return texts


def write_corpus(folder, texts):
    """Half the documents as JSONL, then one plain-text file (one document)."""
    folder.mkdir(exist_ok=True)
    half = len(texts) // 2
    jsonl = folder / "a.jsonl"
    jsonl.write_text("".join(json.dumps({"text": text, "id": i}) + "\n" for i, text in enumerate(texts[:half])))
    jsonl2 = folder / "b.jsonl"
    jsonl2.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts[half:-1]))
    (folder / "c.txt").write_text(texts[-1])
    return [str(jsonl), str(jsonl2), str(folder / "c.txt")]


def expected_stream(texts, tokenizer):
    return [token for text in texts if text.strip()
            for token in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    texts = documents(240)
    return texts, write_corpus(folder, texts)


@pytest.fixture(scope="module")
def written(corpus, tokenizer, tmp_path_factory):
    _, sources = corpus
    out = tmp_path_factory.mktemp("written") / "shards"
    return write_shards(sources, tokenizer, out, shard_tokens=500, batch_chars=400, log=quiet)


def big_vocab_tokenizer(size=70_000):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(size - 3)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


# ------------------------------------------------------------------ writing
def test_shards_hold_the_tokenizers_ids_exactly_as_tokenize_blocks_packs_them(corpus, tokenizer, written):
    texts, _ = corpus
    assert written.dtype == np.uint16 and written.num_shards > 3
    stream = expected_stream(texts, tokenizer)
    assert written.tokens(0, written.num_tokens).tolist() == stream
    kept = [text for text in texts if text.strip()]
    assert written.num_documents == len(kept)
    for index in (0, 5, len(kept) - 1):
        assert written.document(index).tolist() == tokenizer(kept[index], add_special_tokens=False)["input_ids"] + [2]
    packed = data.tokenize_blocks(texts, tokenizer, 16)
    blocks = written.blocks(16, pad_last=True)
    assert len(blocks) == len(packed)
    same = blocks.select(range(len(blocks)))
    assert torch.equal(same.input_ids, packed.input_ids) and torch.equal(same.attention_mask, packed.attention_mask)
    assert len(written.blocks(16)) == len(stream) // 16  # the tail shorter than a block is left out


def test_a_vocabulary_past_65536_is_written_as_uint32(tmp_path):
    tokenizer = big_vocab_tokenizer()
    texts = ["w0 w65535 w69996", "w70 w65600", "w3 w66000 w1"]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    result = write_shards(tmp_path / "big.jsonl", tokenizer, tmp_path / "out", log=quiet)
    assert result.dtype == np.uint32 and result.manifest["dtype"] == "uint32"
    assert result.tokens(0, result.num_tokens).tolist() == expected_stream(texts, tokenizer)
    assert max(result.tokens(0, result.num_tokens)) > 65535
    assert os.path.getsize(tmp_path / "out" / "tokens-00000.bin") == 4 * result.num_tokens


def test_token_dtype_and_a_vocabulary_past_uint32():
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    assert shards.token_dtype(2**32) == np.uint32
    with pytest.raises(InputError, match="does not fit token shards"):
        shards.token_dtype(2**32 + 1)


def test_the_manifest_records_the_tokenizer_sources_and_shards(corpus, tokenizer, written):
    _, sources = corpus
    manifest = json.loads(open(os.path.join(written.path, "manifest.json")).read())
    assert (manifest["format"], manifest["version"], manifest["dtype"], manifest["complete"]) == \
        ("slimlm-token-shards", 1, "uint16", True)
    assert manifest["tokenizer"] == shards.tokenizer_identity(tokenizer)
    assert {"name_or_path", "vocab_size", "digest", "eos_id", "bos_id", "pad_id"} <= set(manifest["tokenizer"])
    assert manifest["settings"]["add_eos"] and not manifest["settings"]["add_bos"]
    assert [source["path"] for source in manifest["sources"]] == [os.path.abspath(s) for s in sources]
    for source in manifest["sources"]:
        assert source["size"] == os.path.getsize(source["path"])
        assert source["mtime"] == os.stat(source["path"]).st_mtime
        assert source["sha256"] == outputs.file_digest(source["path"])
    assert manifest["num_tokens"] == written.num_tokens == sum(s["num_tokens"] for s in manifest["shards"])
    for index, shard in enumerate(manifest["shards"]):
        assert (shard["tokens"], shard["docs"]) == (f"tokens-{index:05d}.bin", f"docs-{index:05d}.bin")
        assert shard["tokens_sha256"] == outputs.file_digest(os.path.join(written.path, shard["tokens"]))
        assert shard["docs_sha256"] == outputs.file_digest(os.path.join(written.path, shard["docs"]))
        offsets = np.fromfile(os.path.join(written.path, shard["docs"]), dtype="<i8")
        assert offsets[0] == 0 and offsets[-1] == shard["num_tokens"] and len(offsets) == shard["num_documents"] + 1
        assert shard["num_tokens"] >= 500 or index == len(manifest["shards"]) - 1
    assert outputs.owned(written.path)
    written.verify()


def test_num_proc_2_writes_byte_identical_shards(corpus, tokenizer, written, tmp_path):
    _, sources = corpus
    parallel = write_shards(sources, tokenizer, tmp_path / "parallel", shard_tokens=500, batch_chars=150,
                            num_proc=2, log=quiet)
    names = sorted(name for name in os.listdir(written.path) if name.endswith(".bin"))
    assert names == sorted(name for name in os.listdir(parallel.path) if name.endswith(".bin"))
    for name in names:
        assert open(os.path.join(written.path, name), "rb").read() == open(os.path.join(parallel.path, name), "rb").read()
    assert parallel.manifest["shards"] == written.manifest["shards"]


def test_bos_and_max_tokens(corpus, tokenizer, tmp_path):
    texts, sources = corpus
    result = write_shards(sources, tokenizer, tmp_path / "out", add_bos=True, max_tokens=300, shard_tokens=100,
                          log=quiet)
    assert result.document(0).tolist() == [1] + tokenizer(texts[1], add_special_tokens=False)["input_ids"] + [2]
    assert 300 <= result.num_tokens < 300 + max(len(result.document(i)) for i in range(result.num_documents))
    assert result.num_tokens - len(result.document(result.num_documents - 1)) < 300


def test_a_hub_source_is_streamed_through_datasets(corpus, tokenizer, tmp_path, monkeypatch):
    """With ``datasets`` importable, ``hub:NAME[:CONFIG]`` streams its split (a stand-in module here)."""
    import sys
    import types

    texts, sources = corpus
    asked = []

    def load_dataset(name, config, split, streaming):
        asked.append((name, config, split, streaming))
        return iter([{"text": text} for text in texts[:10]])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = write_shards(["hub:org/corpus:en", sources[2]], tokenizer, tmp_path / "out", log=quiet)
    assert asked == [("org/corpus", "en", "train", True)]
    assert result.tokens(0, result.num_tokens).tolist() == expected_stream(texts[:10] + texts[-1:], tokenizer)
    assert result.manifest["sources"][0] == {"hub": "org/corpus", "config": "en", "split": "train"}
    assert result.stale_reason(sources=["hub:org/corpus:en", sources[2]]) is None
    assert result.stale_reason(sources=["hub:org/corpus:fr", sources[2]]) == \
        "made from hub:org/corpus config 'en' split 'train', not config 'fr' split 'train'"
    assert result.stale_reason(options=TokenizeOptions(split="test")) == "made with split=None, not 'test'"
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(InputError, match="hub:org/corpus: streaming a hub dataset needs the `datasets` package"):
        write_shards("hub:org/corpus", tokenizer, tmp_path / "other", log=quiet)


# ------------------------------------------------------------------ bad input
def test_bad_sources_are_input_errors_and_leave_nothing(tokenizer, tmp_path):
    with pytest.raises(InputError, match="no data sources given"):
        write_shards([], tokenizer, tmp_path / "out", log=quiet)
    with pytest.raises(InputError, match="does not exist"):
        write_shards(tmp_path / "missing.txt", tokenizer, tmp_path / "out", log=quiet)
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    with pytest.raises(InputError, match="empty or holds only whitespace"):
        write_shards(tmp_path / "blank.jsonl", tokenizer, tmp_path / "out", log=quiet)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("the model")
    with pytest.raises(InputError, match="contains the data"):
        write_shards(tmp_path / "data" / "a.txt", tokenizer, tmp_path / "data", log=quiet)
    outputs.release_locks()  # held by the Python API until then, as by a command until it ends
    assert sorted(os.listdir(tmp_path)) == ["blank.jsonl", "data"]
    with pytest.raises(InputError, match="add_bos is on but the tokenizer has no BOS"):
        write_shards(tmp_path / "data" / "a.txt", big_vocab_tokenizer(10), tmp_path / "out", add_bos=True)
    with pytest.raises(InputError, match="shard_tokens must be > 0"):
        TokenizeOptions(shard_tokens=0)


def test_a_truncated_shard_is_an_input_error_naming_the_file(written, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(written.path, copy)
    victim = copy / "tokens-00002.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    before = victim.read_bytes()
    with pytest.raises(InputError, match=r"tokens-00002.bin is \d+ bytes, not the \d+ of its \d+ tokens"):
        TokenShards(copy)
    assert victim.read_bytes() == before
    assert "tokens-00002.bin" in shards.shards_stale_reason(copy)
    (copy / "docs-00001.bin").unlink()
    (copy / "tokens-00002.bin").write_bytes(open(os.path.join(written.path, "tokens-00002.bin"), "rb").read())
    with pytest.raises(InputError, match="docs-00001.bin is missing"):
        TokenShards(copy)
    assert shards.shards_stale_reason(tmp_path / "nothing") == "missing"


# ------------------------------------------------------------------ staleness
def test_a_changed_source_or_tokenizer_makes_the_shards_stale(corpus, tokenizer, written, tmp_path):
    import shutil

    _, sources = corpus
    assert written.stale_reason(tokenizer, sources, TokenizeOptions()) is None
    written.check(tokenizer=tokenizer, sources=sources)
    # The same tokenizer saved and loaded again is the same tokenizer.
    tokenizer.save_pretrained(tmp_path / "saved")
    assert written.stale_reason(AutoTokenizer.from_pretrained(tmp_path / "saved")) is None
    other = bpe_tokenizer(vocab_size=280)
    assert written.stale_reason(other).startswith("made by another tokenizer")
    with pytest.raises(InputError, match="are stale: made by another tokenizer .* write them again"):
        written.check(tokenizer=other)
    assert "made with add_bos=False, not True" in written.stale_reason(options=TokenizeOptions(add_bos=True))
    copies = [tmp_path / os.path.basename(source) for source in sources]
    for source, copy in zip(sources, copies):
        shutil.copy2(source, copy)
    assert written.stale_reason(sources=copies).startswith("made from other sources")
    paths = write_corpus(tmp_path / "changed", documents(40))
    own = write_shards(paths, tokenizer, tmp_path / "own", log=quiet)
    original = open(paths[1]).read()
    open(paths[1], "w").write(original.replace("model", "layer", 1))  # same size, another digest
    assert own.stale_reason(sources=paths) == \
        f"source {paths[1]} changed since the shards were written (its SHA-256 differs)"
    open(paths[1], "w").write(original)  # touched, same bytes: still the same source
    assert own.stale_reason(sources=paths) is None
    open(paths[2], "a").write(" more")
    assert f"source {paths[2]} changed since the shards were written (" in own.stale_reason(sources=paths)
    assert shards.shards_stale_reason(own.path, tokenizer, paths).endswith("bytes)")


def test_a_rerun_keeps_shards_that_are_up_to_date(corpus, tokenizer, tmp_path):
    _, sources = corpus
    out = tmp_path / "out"
    write_shards(sources, tokenizer, out, shard_tokens=500, log=quiet)
    stamp = os.stat(out / "tokens-00000.bin").st_ino
    with pytest.raises(InputError, match="already exists"):
        write_shards(sources, tokenizer, out, shard_tokens=500, log=quiet)
    said = []
    write_shards(sources, tokenizer, out, shard_tokens=500, overwrite=True, log=said.append)
    assert said == [f"[tokenize] {out} already holds these shards"]
    assert os.stat(out / "tokens-00000.bin").st_ino == stamp
    rewritten = write_shards(sources, tokenizer, out, shard_tokens=700, overwrite=True, log=quiet)
    assert rewritten.manifest["settings"]["shard_tokens"] == 700


def test_an_interrupted_run_keeps_its_finished_shards_and_redoes_the_partial_one(corpus, tokenizer, written,
                                                                                  tmp_path, monkeypatch):
    _, sources = corpus
    out = tmp_path / "out"
    calls = []
    encode = shards._Encoder.__call__

    def interrupted(self, texts):
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return encode(self, texts)

    monkeypatch.setattr(shards._Encoder, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(sources, tokenizer, out, shard_tokens=500, batch_chars=400, log=quiet)
    monkeypatch.setattr(shards._Encoder, "__call__", encode)
    staging = outputs.staging_path(out)
    assert not out.exists() and os.path.isdir(staging)
    partial = json.loads(open(os.path.join(staging, "manifest.json")).read())
    finished = [shard["tokens"] for shard in partial["shards"]]
    assert not partial["complete"] and 0 < len(finished) < written.num_shards
    assert f"tokens-{len(finished):05d}.bin" in os.listdir(staging)  # the partial shard
    inodes = {name: os.stat(os.path.join(staging, name)).st_ino for name in finished}
    said = []
    result = write_shards(sources, tokenizer, out, shard_tokens=500, batch_chars=400, log=said.append)
    assert f"{len(finished)} finished shard(s) kept" in said[0]
    assert {name: os.stat(out / name).st_ino for name in finished} == inodes
    assert result.manifest["shards"] == written.manifest["shards"]
    for name in os.listdir(written.path):
        if name.endswith(".bin"):
            assert (out / name).read_bytes() == open(os.path.join(written.path, name), "rb").read()
    assert not os.path.exists(staging)


def test_a_run_interrupted_before_the_swap_keeps_every_shard(corpus, tokenizer, written, tmp_path, monkeypatch):
    _, sources = corpus
    out = tmp_path / "out"
    commit = outputs.commit

    def interrupted(staging, path):
        if os.path.isdir(staging):  # the shard folder's swap, not a manifest's
            raise KeyboardInterrupt
        commit(staging, path)

    monkeypatch.setattr(outputs, "commit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(sources, tokenizer, out, shard_tokens=500, batch_chars=400, log=quiet)
    monkeypatch.undo()
    said = []
    result = write_shards(sources, tokenizer, out, shard_tokens=500, batch_chars=400, log=said.append)
    assert f"{written.num_shards} finished shard(s) kept" in said[0]
    assert result.manifest["shards"] == written.manifest["shards"] and result.manifest["complete"]


def test_a_partial_run_of_other_inputs_is_discarded(corpus, tokenizer, tmp_path, monkeypatch):
    _, sources = corpus
    out = tmp_path / "out"
    monkeypatch.setattr(shards._ShardSet, "finish", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_shards(sources, tokenizer, out, shard_tokens=500, log=quiet)
    monkeypatch.undo()
    said = []
    write_shards(sources, tokenizer, out, shard_tokens=600, log=said.append)
    assert not any("continuing" in line for line in said)
    assert all(shard["num_tokens"] >= 600 for shard in TokenShards(out).manifest["shards"][:-1])


# ------------------------------------------------------------------ order and sampling
@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000])
def test_the_permutation_is_a_seeded_bijection(n):
    order = Permutation(n, seed=3)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(order, Permutation(n, seed=3)(np.arange(n)))
    if n >= 16:
        assert not np.array_equal(order, Permutation(n, seed=4)(np.arange(n)))
        assert not np.array_equal(order, Permutation(n, seed=3, epoch=1)(np.arange(n)))
        assert not np.array_equal(order, np.arange(n))


def test_seeded_sampling_is_identical_across_runs_and_reads_the_blocks_drawn(written):
    first = written.sample_blocks(5, 8, seed=11)
    again = TokenShards(written.path).sample_blocks(5, 8, seed=11)
    assert isinstance(first, data.TokenBlocks) and first.input_ids.shape == (5, 8)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, written.sample_blocks(5, 8, seed=12).input_ids)
    drawn = list(BlockSampler(len(written.blocks(8)), seed=11))[:5]
    blocks = written.blocks(8)
    assert torch.equal(first.input_ids, torch.stack([blocks[i]["input_ids"] for i in drawn]))
    assert len(set(drawn)) == 5
    assert len(written.sample_blocks(10**6, 8)) == len(blocks)


def test_items_are_training_dicts_with_padding_masked(written):
    blocks = written.blocks(64, pad_last=True)
    item = blocks[0]
    assert set(item) == {"input_ids", "attention_mask", "labels"}
    assert item["input_ids"].dtype == torch.long and torch.equal(item["labels"], item["input_ids"])
    last = blocks[len(blocks) - 1]
    real = written.num_tokens - (len(blocks) - 1) * 64
    assert last["attention_mask"].sum() == real and (last["labels"][real:] == -100).all()
    assert (last["input_ids"][real:] == written.pad_id).all()
    with pytest.raises(InputError, match="fewer than one block"):
        written.blocks(written.num_tokens + 1)


def test_a_resumed_sampler_continues_at_the_same_sample(written):
    stream = written.stream(8, seed=5)
    loader = torch.utils.data.DataLoader(stream, batch_size=4)
    batches = iter(loader)
    seen = [next(batches)["input_ids"] for _ in range(3)]
    state = stream.state_dict()
    assert state["index"] == 12 and state["epoch"] == 0
    rest = [batch["input_ids"] for batch in batches]
    resumed = written.stream(8, seed=5)
    resumed.load_state_dict(state)
    again = [batch["input_ids"] for batch in torch.utils.data.DataLoader(resumed, batch_size=4)]
    assert len(again) == len(rest) and all(torch.equal(a, b) for a, b in zip(again, rest))
    everything = torch.cat(seen + rest)[:, 0]
    assert len(everything) == len(written.blocks(8))
    # The next epoch is another order of the same blocks.
    sampler = BlockSampler(50, seed=5)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(50)) and first != second
    with pytest.raises(ValueError, match="seed=6"):
        BlockSampler(50, seed=5).load_state_dict(BlockSampler(50, seed=6).state_dict())


@pytest.mark.parametrize("num_blocks, world_size", [(10, 2), (11, 2), (11, 3), (1, 2)])
def test_ranks_read_disjoint_blocks_and_together_every_block_once(num_blocks, world_size):
    for epoch in range(2):
        per_rank = []
        for rank in range(world_size):
            sampler = BlockSampler(num_blocks, seed=1, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert len(per_rank[-1]) == len(sampler)
        union = [index for indices in per_rank for index in indices]
        assert sorted(union) == list(range(num_blocks))
        assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    if num_blocks >= world_size:
        even = [list(BlockSampler(num_blocks, seed=1, rank=r, world_size=world_size, drop_last=True))
                for r in range(world_size)]
        assert {len(indices) for indices in even} == {num_blocks // world_size}
        assert len({index for indices in even for index in indices}) == num_blocks // world_size * world_size


def test_the_split_by_document_puts_each_document_on_one_side(tmp_path, tokenizer, corpus):
    """``documents: train|heldout`` with one seed and fraction: the two sides are disjoint, together
    every document of ``all``, the held-out share near the fraction; another seed, another split."""
    texts, sources = corpus

    def side(name, documents, seed=0):
        return write_shards(sources, tokenizer, tmp_path / name, documents=documents, heldout_fraction=0.25,
                            seed=seed, log=quiet)

    whole, train, heldout = side("all", "all"), side("train", "train"), side("heldout", "heldout")

    def docs(shards):
        return [tuple(shards.document(i).tolist()) for i in range(shards.num_documents)]

    assert sorted(docs(train) + docs(heldout)) == sorted(docs(whole))
    assert not set(docs(train)) & set(docs(heldout))
    assert 0.1 < heldout.num_documents / whole.num_documents < 0.4
    assert docs(side("heldout-1", "heldout", seed=1)) != docs(heldout)
    assert heldout.stale_reason(tokenizer, sources, TokenizeOptions(documents="heldout", heldout_fraction=0.5))
