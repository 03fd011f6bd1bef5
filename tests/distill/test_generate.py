"""Synthetic data: generation records, resume, dedupe, length filter, prompts, mixing."""
import json

import pytest
import torch

from slimlm.distill.generate import (
    SyntheticDataset,
    generate_synthetic,
    load_prompts,
    mix,
    prompts_from_texts,
    read_jsonl,
)
from slimlm.distill.prompts import joined_text
from slimlm.distill.topk_cache import load_teacher_topk, teacher_topk
from tiny import assert_cached_targets_are_live, tiny_model, word_tokenizer

PROMPTS = ["the teacher is", "a small model", "we prune the layer", "they distill data"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", "training", vocab_size=len(word_tokenizer()))


ENGINES = pytest.mark.parametrize("engine", ["slimlm", "generate"])


@ENGINES
def test_records_have_provenance_and_respect_lengths(teacher, tmp_path, engine):
    out = tmp_path / "synthetic.jsonl"
    tokenizer = word_tokenizer()
    data = generate_synthetic(
        teacher, tokenizer, PROMPTS, out_path=out, max_new_tokens=6, num_return_sequences=2,
        batch_size=3, seed=7, progress=False, engine=engine, filters=False,
    )
    records = read_jsonl(out)
    assert len(data) == len(records) > 0
    for record in records:
        assert record["prompt"] in PROMPTS and record["source"] == "data"
        # prompt and answer joined as the teacher saw them: the tokens it read and wrote
        assert record["text"] == joined_text(tokenizer, record["ids"][: len(record["ids"]) - record["num_new_tokens"]
                                                                      - (record["finish"] == "eos")],
                                             record["ids"][len(record["ids"]) - record["num_new_tokens"]
                                                           - (record["finish"] == "eos"):])
        assert record["text"].startswith(record["prompt"])
        assert 1 <= record["num_new_tokens"] <= 6
        assert record["sampling"]["seed"] == 7 and record["sampling"]["num_return_sequences"] == 2
        assert len(record["teacher"]["fingerprint"]) == 16
    generations = [" ".join(r["generation"].split()) for r in records]
    assert len(generations) == len(set(generations)), "duplicates must be written once"
    assert data.counts["kept"] == len(records) and data.counts["kept"] + data.counts["duplicate"] + \
        data.counts["short"] + data.counts["empty"] == 2 * len(PROMPTS)


@ENGINES
def test_same_seed_same_output(teacher, tmp_path, engine):
    kwargs = dict(max_new_tokens=5, batch_size=2, seed=3, progress=False, engine=engine)
    first = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "a.jsonl", **kwargs)
    second = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "b.jsonl", **kwargs)
    assert first.texts() == second.texts()


def test_slimlm_samples_do_not_depend_on_the_batching(teacher, tmp_path):
    kwargs = dict(max_new_tokens=6, seed=3, progress=False, filters=False, dedupe=False, min_new_tokens=0)
    one = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "a.jsonl", batch_size=1, **kwargs)
    four = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "b.jsonl", batch_size=4, **kwargs)
    assert sorted(r["ids"] for r in one.records) == sorted(r["ids"] for r in four.records)


def test_resume_skips_prompts_already_written(teacher, tmp_path):
    out = tmp_path / "synthetic.jsonl"
    kwargs = dict(max_new_tokens=5, batch_size=2, seed=1, min_new_tokens=0, dedupe=False, progress=False,
                  filters=False)
    generate_synthetic(teacher, word_tokenizer(), PROMPTS[:2], out_path=out, **kwargs)
    written = read_jsonl(out)
    with open(out, "a") as handle:
        handle.write('{"prompt": "torn')  # an interrupted write
    data = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=out, **kwargs)
    assert [r["prompt"] for r in data.records[: len(written)]] == [r["prompt"] for r in written]
    assert {r["prompt"] for r in data.records} == set(PROMPTS)
    assert SyntheticDataset.load(out).texts() == data.texts()


def test_length_filter_drops_short_generations(teacher, tmp_path):
    data = generate_synthetic(
        teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "s.jsonl", max_new_tokens=4, min_new_tokens=4,
        progress=False, filters=False,
    )
    assert all(r["num_new_tokens"] == 4 for r in data.records)


def test_sources_free_sampling_and_filters(teacher, tmp_path):
    prompts = [("general", "a small model"), ("bos", ""), ("bos", ""), ("data", "the teacher is")]
    data = generate_synthetic(teacher, word_tokenizer(), prompts, out_path=tmp_path / "s.jsonl", max_new_tokens=8,
                              min_new_tokens=1, progress=False, dedupe=False)
    counts = data.counts
    assert sum(counts.values()) == len(prompts) and counts["kept"] == len(data)
    # a sample cut by the length limit is trimmed to a sentence end, or dropped as cut
    for record in data.records:
        assert record["finish"] == "eos" or record["generation"].rstrip().endswith((".", "!", "?"))
    # free samples start from the BOS (or EOS) token alone, and both draws of "" are made
    free = generate_synthetic(teacher, word_tokenizer(), [("bos", "")] * 3, out_path=tmp_path / "f.jsonl",
                              max_new_tokens=4, min_new_tokens=0, progress=False, dedupe=False, filters=False)
    assert len(free) == 3 and all(r["ids"][0] in (word_tokenizer().bos_token_id, word_tokenizer().eos_token_id)
                                  for r in free.records)


@ENGINES
def test_kept_topk_equals_a_live_teacher_forward(teacher, tmp_path, engine):
    prompts = [("data", p) for p in PROMPTS] + [("general", "the layer is")]
    data = generate_synthetic(teacher, word_tokenizer(), prompts, out_path=tmp_path / "s.jsonl", max_new_tokens=6,
                              min_new_tokens=0, progress=False, filters=False, dedupe=False, engine=engine,
                              keep_topk=4, cache_dir=tmp_path / "cache")
    assert set(data.caches) == {"data", "general"}
    # the row after a closing EOS is never a target
    assert_cached_targets_are_live(teacher, data, 4, lambda record: record["finish"] == "eos")


def test_an_interrupted_cache_continues(teacher, tmp_path):
    out, cache = tmp_path / "s.jsonl", tmp_path / "cache"
    kwargs = dict(max_new_tokens=5, min_new_tokens=0, progress=False, filters=False, dedupe=False, keep_topk=3,
                  cache_dir=cache)
    generate_synthetic(teacher, word_tokenizer(), PROMPTS[:2], out_path=out, **kwargs)
    (cache / "data" / "manifest.json").unlink()  # as if killed before the cache was finished
    data = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=out, **kwargs)
    assert load_teacher_topk(data.caches["data"]).num_sequences == len(data) == len(PROMPTS)


def test_prompt_longer_than_context_is_an_error(teacher, tmp_path):
    long_prompt = " ".join(["the"] * 126)
    with pytest.raises(ValueError, match="prompt 1 has 126 tokens; with max_new_tokens=8 it exceeds"):
        generate_synthetic(teacher, word_tokenizer(), ["a model", long_prompt], out_path=tmp_path / "x.jsonl",
                           max_new_tokens=8, progress=False)
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_sampling_parameters(teacher, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "x.jsonl", progress=False, **kwargs)


def test_prompts_from_file_and_corpus(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")
    assert load_prompts(jsonl) == PROMPTS
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(text) == ["first prompt", "second prompt"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="no string field 'prompt'"):
        load_prompts(tmp_path / "bad.jsonl")
    corpus = ["Pruning removes heads. Then we distill.\n\nShort.\n\nDistillation recovers quality! It is cheap."]
    assert prompts_from_texts(corpus, max_prompts=5) == ["Pruning removes heads.", "Distillation recovers quality!"]


def test_mix_ratio_and_determinism():
    classic, synthetic = [("c", i) for i in range(30)], [("s", i) for i in range(10)]
    mixed = mix(classic, synthetic, synthetic_fraction=0.25, seed=0)
    assert len(mixed) == 40 and sum(item[0] == "s" for item in mixed) == 10
    assert mixed == mix(classic, synthetic, synthetic_fraction=0.25, seed=0)
    assert len(set(mixed)) == len(mixed)
    assert all(item[0] == "c" for item in mix(classic, synthetic, synthetic_fraction=0.0))
    with pytest.raises(ValueError, match="cannot draw"):
        mix(classic, synthetic, synthetic_fraction=0.5, num_samples=40)
