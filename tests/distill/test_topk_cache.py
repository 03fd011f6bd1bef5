"""cache_teacher_topk writes what the teacher computes; the loader streams it back and refuses bad files."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimlm.distill import TeacherTopKCache, cache_teacher_topk, load_teacher_topk
from slimlm.losses import topk_kl_div_loss
from tiny import tiny_model

K = 5


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", "training", vocab_size=64, seed=3)


def sequences():
    gen = torch.Generator().manual_seed(0)
    lengths = [6, 6, 6, 4, 9]
    return [torch.randint(3, 64, (n,), generator=gen) for n in lengths]


@pytest.fixture
def cache_dir(tmp_path, teacher):
    path = tmp_path / "cache"
    shards = cache_teacher_topk(teacher, [{"input_ids": s} for s in sequences()], K, path, temperature=2.0,
                                batch_size=2, shard_tokens=10, chunk_size=7)
    assert len(shards) >= 2 and all(os.path.exists(p) for p in shards)
    return path


def test_roundtrip_matches_the_teacher(cache_dir, teacher):
    cache = load_teacher_topk(cache_dir)
    assert (cache.k, cache.temperature, cache.vocab_size, len(cache)) == (K, 2.0, 64, 5)
    items = list(cache)
    for seq, item in zip(sequences(), items):
        assert torch.equal(item["input_ids"], seq)
        with torch.no_grad():
            logprobs = torch.log_softmax(teacher(seq[None]).logits[0].float() / 2.0, -1)
        top = logprobs.topk(K, -1)
        torch.testing.assert_close(item["topk_logprobs"], top.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logprobs.gather(-1, item["topk_indices"]), item["topk_logprobs"], rtol=1e-5, atol=1e-5)
        assert item["topk_indices"].dtype == torch.int64


def test_shard_metadata_records_the_teacher(cache_dir):
    with open(os.path.join(cache_dir, "index.json")) as handle:
        index = json.load(handle)
    assert index["format"] == "slimlm.teacher_topk/1" and index["teacher_model_type"] == "llama"
    assert sum(s["num_sequences"] for s in index["shards"]) == 5
    from safetensors import safe_open

    with safe_open(os.path.join(cache_dir, index["shards"][0]["file"]), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["k"] == str(K) and meta["temperature"] == "2.0" and meta["teacher_vocab_size"] == "64"


def test_cached_teacher_drives_the_sparse_loss(cache_dir):
    """Student logits against a cached sequence: the shifted rows line up with the labels."""
    item = next(iter(load_teacher_topk(cache_dir)))
    student = torch.randn(item["input_ids"].numel(), 64, requires_grad=True)
    labels = torch.cat([item["input_ids"][1:], torch.tensor([-100])])
    loss = topk_kl_div_loss(student, item["topk_logprobs"], item["topk_indices"], labels=labels, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(student.grad[-1] == 0) and student.grad[0].abs().sum() > 0


def test_compatibility_checks(cache_dir):
    cache = TeacherTopKCache(cache_dir)
    cache.check_compatible(vocab_size=64, temperature=2.0)
    with pytest.raises(ValueError, match=r"vocabulary \(64\) is larger than the student's \(60\)"):
        cache.check_compatible(vocab_size=60)
    with pytest.raises(ValueError, match="cached at temperature 2.0"):
        cache.check_compatible(temperature=1.0)


def _corrupt(cache_dir, tensor, value):
    with open(os.path.join(cache_dir, "index.json")) as handle:
        file = os.path.join(cache_dir, json.load(handle)["shards"][0]["file"])
    from safetensors import safe_open

    with safe_open(file, framework="pt") as handle:
        meta = handle.metadata()
    tensors = load_file(file)
    tensors[tensor] = value(tensors[tensor])
    save_file(tensors, file, metadata=meta)
    return file


@pytest.mark.parametrize("tensor,value,message", [
    ("topk_indices", lambda t: t + 64, r"topk_indices' holds ids in \[\d+, \d+\], outside the teacher's vocabulary of 64"),
    ("topk_logprobs", lambda t: t[:, :3].contiguous(), "'topk_logprobs' has shape"),
    ("sequence_offsets", lambda t: t.flip(0).contiguous(), "sequence_offsets"),
])
def test_corrupt_shard_names_file_and_field(cache_dir, tensor, value, message):
    file = _corrupt(cache_dir, tensor, value)
    with pytest.raises(ValueError, match=message) as error:
        list(load_teacher_topk(cache_dir))
    assert os.path.basename(file) in str(error.value)


def test_bad_arguments_and_folders(tmp_path, teacher, cache_dir):
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 64\]"):
        cache_teacher_topk(teacher, sequences(), 65, tmp_path / "a")
    with pytest.raises(ValueError, match="already holds a teacher cache"):
        cache_teacher_topk(teacher, sequences(), K, cache_dir)
    with pytest.raises(ValueError, match="dataset item 0"):
        cache_teacher_topk(teacher, [torch.zeros(2, 3, dtype=torch.long)], K, tmp_path / "b")
    with pytest.raises(ValueError, match="not a teacher top-k cache"):
        load_teacher_topk(tmp_path / "missing")
    index = os.path.join(cache_dir, "index.json")
    with open(index) as handle:
        data = json.load(handle)
    data["format"] = "other/9"
    with open(index, "w") as handle:
        json.dump(data, handle)
    with pytest.raises(ValueError, match="field 'format'"):
        load_teacher_topk(cache_dir)
