"""cache_teacher_topk writes what the teacher computes (to the codec's precision); the reader gives
it back per sequence, token range or block, refuses damaged or foreign caches, and an
interrupted write resumes without redoing or overwriting its finished parts."""
import json
import os

import pytest
import torch

from slimlm import outputs
from slimlm.distill import TeacherTopKCache, cache_teacher_topk, load_teacher_topk
from slimlm.distill.topk_cache import teacher_identity, tokenizer_identity
from slimlm.distill.topk_codec import MASS_STEP, TopKCodec
from slimlm.errors import InputError
from slimlm.losses import fused_linear_topk_kl_div_loss, topk_kl_div_loss
from tiny import tiny_model, word_tokenizer

K = 5
TAU = 2.0
LENGTHS = [6, 6, 6, 4, 9]


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", "training", vocab_size=64, seed=3)


def sequences():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 64, (n,), generator=gen) for n in LENGTHS]


def write(teacher, path, data=None, **options):
    options = {"temperature": TAU, "batch_size": 2, "shard_tokens": 10, "chunk_size": 7, **options}
    return cache_teacher_topk(teacher, data if data is not None else [{"input_ids": s} for s in sequences()], K, path,
                              **options)


@pytest.fixture
def cache_dir(tmp_path, teacher):
    path = tmp_path / "cache"
    files = write(teacher, path)
    assert len(files) >= 2 and all(os.path.exists(p) for p in files)
    return path


def manifest(path) -> dict:
    with open(os.path.join(path, "manifest.json")) as handle:
        return json.load(handle)


def live_topk(teacher, seq):
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(seq[None]).logits[0].float() / TAU, -1)
    return logprobs, logprobs.topk(K, -1)


def assert_matches_live(item_logprobs, item_ids, full):
    """The cached top-k is the live teacher's to the codec's precision: the same ids, each
    (p / p_max)^γ within half a step, the top-k mass within half a step of its logit."""
    codec = TopKCodec(K, 64)
    top = full.topk(K, -1)
    assert torch.equal(item_ids.sort(-1).values, top.indices.sort(-1).values)
    assert bool((item_logprobs.diff(dim=-1) <= 0).all())
    exact = full.gather(-1, item_ids).double()
    cached = item_logprobs.double()
    companded = lambda v: ((v - v.max(-1, keepdim=True).values) * codec.power).exp()  # noqa: E731
    assert float((companded(cached) - companded(exact)).abs().max()) <= 0.5 / codec.levels + 1e-5
    mass, cached_mass = exact.logsumexp(-1), cached.logsumexp(-1)
    logit = lambda m: m - torch.log(-torch.expm1(m))  # noqa: E731
    assert float((logit(cached_mass) - logit(mass)).abs().max()) <= MASS_STEP / 2 + 1e-4
    tail, cached_tail = -torch.expm1(mass), -torch.expm1(cached_mass)
    kl = (exact.exp() * (exact - cached)).sum(-1) + tail * (tail.log() - cached_tail.log())
    assert float(kl.max()) < 1e-3


def test_roundtrip_matches_the_teacher(cache_dir, teacher):
    cache = load_teacher_topk(cache_dir)
    assert (cache.k, cache.temperature, cache.vocab_size, len(cache), cache.num_tokens) == (K, TAU, 64, 5, sum(LENGTHS))
    items = list(cache)
    assert len(items) == 5
    for seq, item in zip(sequences(), items):
        assert torch.equal(item["input_ids"], seq)
        assert item["topk_indices"].dtype == torch.int64 and item["topk_logprobs"].dtype == torch.float32
        full, _ = live_topk(teacher, seq)
        assert_matches_live(item["topk_logprobs"], item["topk_indices"], full)


def test_token_ranges_and_blocks_cross_parts(cache_dir):
    cache = load_teacher_topk(cache_dir)
    items = list(cache)
    logprobs, ids = cache.read(0, cache.num_tokens)
    assert torch.equal(logprobs, torch.cat([item["topk_logprobs"] for item in items]))
    assert torch.equal(ids, torch.cat([item["topk_indices"] for item in items]))
    assert torch.equal(cache.tokens(0, cache.num_tokens), torch.cat(sequences()))
    block_logprobs, block_ids = cache.blocks(torch.tensor([0, 9, 25]), 6)  # 9..15 crosses the first part's end
    assert block_logprobs.shape == block_ids.shape == (3, 6, K)
    for row, start in enumerate((0, 9, 25)):
        assert torch.equal(block_logprobs[row], logprobs[start:start + 6])
        assert torch.equal(block_ids[row], ids[start:start + 6])
    assert cache.read(4, 4)[0].shape == (0, K)
    with pytest.raises(ValueError, match=r"token range \[28, 40\) is not inside \[0, 31\)"):
        cache.read(28, 40)


def test_manifest_records_the_run(cache_dir, teacher):
    data = manifest(cache_dir)
    codec = TopKCodec(K, 64)
    assert data["format"] == "slimlm.teacher_topk/2" and data["complete"] is True
    assert (data["k"], data["vocab_size"], data["temperature"], data["record_bytes"]) == (K, 64, 2.0, codec.record_bytes)
    assert data["codec"] == codec.params() and data["teacher"] == teacher_identity(teacher)
    assert data["teacher"]["teacher_model_type"] == "llama" and data["shards"] is None
    assert [f["num_tokens"] for f in data["files"]] == [12, 10, 9]  # parts close at a sequence end >= 10 tokens
    assert sum(f["num_sequences"] for f in data["files"]) == data["num_sequences"] == 5
    for entry in data["files"]:
        for name in ("records", "tokens", "offsets"):
            assert outputs.file_digest(os.path.join(cache_dir, entry[name])) == entry["digests"][name]
        assert os.path.getsize(os.path.join(cache_dir, entry["records"])) == entry["num_tokens"] * codec.record_bytes
    assert not [name for name in os.listdir(cache_dir) if name.startswith(".")]


def test_parts_aligned_with_given_token_shards(tmp_path, teacher):
    write(teacher, tmp_path / "a", shard_tokens=[12, 10, 9], shards="token-shards-digest")
    data = manifest(tmp_path / "a")
    assert [f["num_tokens"] for f in data["files"]] == [12, 10, 9] and data["shards"] == "token-shards-digest"
    with pytest.raises(ValueError, match=r"a sequence of 6 tokens crosses the end of token shard 0 \(11 tokens, 6 filled\)"):
        write(teacher, tmp_path / "b", shard_tokens=[11, 11, 9])
    with pytest.raises(ValueError, match="more tokens than the 2 token shards"):
        write(teacher, tmp_path / "c", shard_tokens=[12, 10])
    with pytest.raises(ValueError, match="fills 3 of the 4 token shards"):
        write(teacher, tmp_path / "d", shard_tokens=[12, 10, 9, 4])


def test_cached_teacher_drives_the_sparse_losses(cache_dir, teacher):
    """Student logits against a cached sequence: the shifted rows line up with the labels; a
    block of the cache feeds the fused loss on hidden states."""
    item = next(iter(load_teacher_topk(cache_dir)))
    student = torch.randn(item["input_ids"].numel(), 64, requires_grad=True)
    labels = torch.cat([item["input_ids"][1:], torch.tensor([-100])])
    loss = topk_kl_div_loss(student, item["topk_logprobs"], item["topk_indices"], labels=labels, temperature=TAU)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(student.grad[-1] == 0) and student.grad[0].abs().sum() > 0
    logprobs, ids = load_teacher_topk(cache_dir).blocks([0, 12], 6)
    hidden, weight = torch.randn(2, 6, 16, requires_grad=True), torch.randn(64, 16, requires_grad=True)
    fused = fused_linear_topk_kl_div_loss(hidden, weight, logprobs, ids, temperature=TAU)
    fused.backward()
    assert torch.isfinite(fused) and hidden.grad.abs().sum() > 0


def test_compatibility_checks(tmp_path, cache_dir, teacher):
    cache = TeacherTopKCache(cache_dir)
    cache.check_compatible(vocab_size=64, temperature=2.0, k=K, teacher=teacher)
    with pytest.raises(ValueError, match=r"vocabulary \(64\) is larger than the student's \(60\)"):
        cache.check_compatible(vocab_size=60)
    with pytest.raises(ValueError, match="cached at temperature 2.0"):
        cache.check_compatible(temperature=1.0)
    with pytest.raises(ValueError, match="cached with k = 5, asked for k = 8"):
        cache.check_compatible(k=8)
    with pytest.raises(ValueError, match="cached from another teacher \\(teacher_dtype 'float32', asked for 'bfloat16'\\)"):
        cache.check_compatible(teacher={**teacher_identity(teacher), "teacher_dtype": "bfloat16"})
    with pytest.raises(ValueError, match="aligned with the token shards None, not with 'abc'"):
        cache.check_compatible(shards="abc")
    tokenizer = word_tokenizer()
    write(teacher, tmp_path / "t", tokenizer=tokenizer, shards="abc")
    tagged = TeacherTopKCache(tmp_path / "t")
    tagged.check_compatible(tokenizer=tokenizer, shards="abc")
    with pytest.raises(ValueError, match="cached from another tokenizer \\(tokenizer_vocab_digest"):
        tagged.check_compatible(tokenizer={**tokenizer_identity(tokenizer), "tokenizer_vocab_digest": "0" * 16})
    with pytest.raises(ValueError, match="cached from another tokenizer"):
        cache.check_compatible(tokenizer=tokenizer)


def part_file(cache_dir, part: int, name: str) -> str:
    return os.path.join(cache_dir, manifest(cache_dir)["files"][part][name])


def test_truncated_file_is_named(cache_dir):
    file = part_file(cache_dir, 1, "records")
    with open(file, "r+b") as handle:
        handle.truncate(os.path.getsize(file) - 3)
    with pytest.raises(InputError, match=rf"{file} is truncated: \d+ bytes where .*manifest.json says \d+"):
        load_teacher_topk(cache_dir)


def test_corrupt_records_and_offsets_are_named(cache_dir):
    records = part_file(cache_dir, 1, "records")
    with open(records, "r+b") as handle:
        handle.seek(2 * manifest(cache_dir)["record_bytes"] + 2)  # token 2 of part 1: its Elias–Fano bits
        handle.write(b"\xff")
    cache = load_teacher_topk(cache_dir)
    with pytest.raises(InputError, match=rf"{records} \(tokens 0:6\): record 2 is corrupt"):
        list(cache)
    offsets = part_file(cache_dir, 0, "offsets")
    with open(offsets, "r+b") as handle:
        values = torch.frombuffer(bytearray(handle.read()), dtype=torch.int64).flip(0)
        handle.seek(0)
        handle.write(values.numpy().tobytes())
    with pytest.raises(InputError, match=rf"{offsets}: the offsets do not split 12 tokens into 2"):
        load_teacher_topk(cache_dir).sequence(0)
    with pytest.raises(InputError, match=rf"{offsets} does not match the digest"):
        load_teacher_topk(cache_dir).verify()


def test_bad_arguments_and_folders(tmp_path, teacher, cache_dir):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 64\]"):
        cache_teacher_topk(teacher, sequences(), 65, tmp_path / "a")
    with pytest.raises(ValueError, match="already holds a teacher cache"):
        cache_teacher_topk(teacher, sequences(), K, cache_dir)
    with pytest.raises(ValueError, match="dataset item 0"):
        cache_teacher_topk(teacher, [torch.zeros(2, 3, dtype=torch.long)], K, tmp_path / "b")
    with pytest.raises(ValueError, match=r"dataset item 1: token ids must lie in \[0, 65536\)"):
        cache_teacher_topk(teacher, [torch.tensor([3, 4]), torch.tensor([3, 70000])], K, tmp_path / "c")
    with pytest.raises(ValueError, match="not a teacher top-k cache"):
        load_teacher_topk(tmp_path / "missing")
    old = tmp_path / "format1"
    old.mkdir()
    (old / "index.json").write_text(json.dumps({"format": "slimlm.teacher_topk/1"}))
    with pytest.raises(InputError, match="format slimlm.teacher_topk/1 .* re-cache it"):
        load_teacher_topk(old)
    data = manifest(cache_dir)
    data["format"] = "other/9"
    with open(os.path.join(cache_dir, "manifest.json"), "w") as handle:
        json.dump(data, handle)
    with pytest.raises(ValueError, match="field 'format'"):
        load_teacher_topk(cache_dir)


def interrupted(after: int):
    """The dataset, failing after ``after`` sequences (a crash of the caching run)."""
    for position, seq in enumerate(sequences()):
        if position == after:
            raise RuntimeError("interrupted")
        yield {"input_ids": seq}


def test_interrupted_run_resumes_keeping_finished_parts(tmp_path, teacher):
    path = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        write(teacher, path, interrupted(4))  # part 0 (sequences 0, 1) is finished, part 1 is not
    assert manifest(path)["complete"] is False and len(manifest(path)["files"]) == 1
    assert sorted(os.listdir(path)) == ["manifest.json", "part-00000.offsets", "part-00000.tokens", "part-00000.topk"]
    with pytest.raises(InputError, match="unfinished teacher cache"):
        load_teacher_topk(path)
    first = os.path.join(path, "part-00000.topk")
    before = os.stat(first)

    with pytest.raises(InputError, match="an unfinished cache of another run \\('temperature' is 2.0, this run's is 1.0\\)"):
        write(teacher, path, temperature=1.0)
    changed = sequences()
    changed[1][0] += 1
    with pytest.raises(InputError, match="dataset item 1 differs from the sequence the unfinished cache"):
        write(teacher, path, [{"input_ids": s} for s in changed])
    with open(first, "r+b") as handle:
        content = handle.read()
        handle.truncate(len(content) - 1)
    with pytest.raises(InputError, match=rf"{first} is truncated"):
        write(teacher, path)
    assert os.path.getsize(first) == len(content) - 1  # reported, not overwritten
    with open(first, "wb") as handle:
        handle.write(content)
    kept = os.stat(first)

    write(teacher, path)
    assert os.stat(first).st_ino == kept.st_ino and os.stat(first).st_mtime_ns == kept.st_mtime_ns
    assert before.st_size == kept.st_size
    cache = load_teacher_topk(path)
    cache.verify()
    assert [f["num_tokens"] for f in cache.files] == [12, 10, 9]
    for seq, item in zip(sequences(), cache):
        assert torch.equal(item["input_ids"], seq)
        assert_matches_live(item["topk_logprobs"], item["topk_indices"], live_topk(teacher, seq)[0])


def test_interrupted_run_leaves_no_partial_part(tmp_path, teacher):
    path = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="interrupted"):
        write(teacher, path, interrupted(1))
    assert os.listdir(path) == []
    write(teacher, path)
    assert len(load_teacher_topk(path)) == 5


def test_packed_blocks_cut_the_stream_and_mask_sequence_starts(cache_dir):
    from slimlm.distill.topk_cache import PackedTopKBlocks

    cache = load_teacher_topk(cache_dir)
    blocks = PackedTopKBlocks(cache_dir, 8)
    stream = torch.cat(sequences())
    assert len(blocks) == stream.numel() // 8  # the last partial block is dropped
    starts = set(torch.tensor([0] + LENGTHS).cumsum(0)[:-1].tolist())
    for index in range(len(blocks)):
        item = blocks[index]
        span = range(index * 8, (index + 1) * 8)
        assert torch.equal(item["input_ids"], stream[span.start:span.stop])
        logprobs, ids = cache.read(span.start, span.stop)
        assert torch.equal(item["topk_logprobs"], logprobs) and torch.equal(item["topk_indices"], ids)
        # A token that begins a sequence is never a target: the row before it belongs to another sequence.
        masked = {span.start + t for t in range(8) if item["labels"][t] == -100}
        assert masked == starts & set(span)
    with pytest.raises(ValueError, match="fewer than one block"):
        PackedTopKBlocks(cache_dir, stream.numel() + 1)
