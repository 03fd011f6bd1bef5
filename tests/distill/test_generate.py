"""Synthetic data: generation records, resume, dedupe, length filter, prompts, mixing."""
import json

import pytest

from slimlm.distill.generate import (
    SyntheticDataset,
    generate_synthetic,
    load_prompts,
    mix,
    prompts_from_texts,
    read_jsonl,
)
from tiny import tiny_model, word_tokenizer

PROMPTS = ["the teacher is", "a small model", "we prune the layer", "they distill data"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", "training", vocab_size=len(word_tokenizer()))


def test_records_have_provenance_and_respect_lengths(teacher, tmp_path):
    out = tmp_path / "synthetic.jsonl"
    data = generate_synthetic(
        teacher, word_tokenizer(), PROMPTS, out_path=out, max_new_tokens=6, num_return_sequences=2,
        batch_size=3, seed=7, progress=False,
    )
    records = read_jsonl(out)
    assert len(data) == len(records) > 0
    for record in records:
        assert record["prompt"] in PROMPTS
        assert record["text"] == record["prompt"] + record["generation"]
        assert 1 <= record["num_new_tokens"] <= 6
        assert record["sampling"]["seed"] == 7 and record["sampling"]["num_return_sequences"] == 2
        assert len(record["teacher"]["fingerprint"]) == 16
    generations = [" ".join(r["generation"].split()) for r in records]
    assert len(generations) == len(set(generations)), "duplicates must be written once"


def test_same_seed_same_output(teacher, tmp_path):
    kwargs = dict(max_new_tokens=5, batch_size=2, seed=3, progress=False)
    first = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "a.jsonl", **kwargs)
    second = generate_synthetic(teacher, word_tokenizer(), PROMPTS, out_path=tmp_path / "b.jsonl", **kwargs)
    assert first.texts() == second.texts()


def test_resume_skips_prompts_already_written(teacher, tmp_path):
    out = tmp_path / "synthetic.jsonl"
    kwargs = dict(max_new_tokens=5, batch_size=2, seed=1, min_new_tokens=0, dedupe=False, progress=False)
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
        progress=False,
    )
    assert all(r["num_new_tokens"] == 4 for r in data.records)


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
