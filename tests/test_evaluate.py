"""slimlm.evaluate: masked perplexity against a hand computation, throughput, samples, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

import slimlm
from slimlm import evaluate
from slimlm.data import TokenBlocks
from tests.tiny import tiny_model, word_tokenizer


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "training", vocab_size=64)


def blocks_with_padding():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 64, (3, 10), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 2:] = 0
    input_ids[mask == 0] = 0
    return TokenBlocks(input_ids, mask)


def test_perplexity_matches_a_per_row_computation(model):
    blocks = blocks_with_padding()
    result = evaluate.perplexity(model, blocks, batch_size=2, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in range(len(blocks)):
            length = int(blocks.attention_mask[row].sum())
            ids = blocks.input_ids[row, :length].unsqueeze(0)
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += length - 1
    assert result["predicted"] == count == 9 + 5 + 1
    assert result["tokens"] == 10 + 6 + 2
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["tokens_per_s"] > 0 and result["seconds"] > 0


def test_padding_content_does_not_change_perplexity(model):
    blocks = blocks_with_padding()
    other = blocks.input_ids.clone()
    other[blocks.attention_mask == 0] = 7
    first = evaluate.perplexity(model, blocks, progress=False)["nll"]
    second = evaluate.perplexity(model, TokenBlocks(other, blocks.attention_mask), progress=False)["nll"]
    assert first == pytest.approx(second, rel=1e-5)


def test_perplexity_bad_input(model):
    with pytest.raises(ValueError, match="TokenBlocks"):
        evaluate.perplexity(model, torch.zeros(2, 4, dtype=torch.long))
    lonely = TokenBlocks(torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate.perplexity(model, lonely, progress=False)
    outside = TokenBlocks(torch.full((1, 4), 100), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        evaluate.perplexity(model, outside, progress=False)


def test_greedy_samples_are_deterministic_and_bounded():
    tokenizer = word_tokenizer()
    model = tiny_model("llama", "training", vocab_size=len(tokenizer))
    first = evaluate.greedy_samples(model, tokenizer, ["the model is", "we prune"], max_new_tokens=5)
    second = evaluate.greedy_samples(model, tokenizer, ["the model is", "we prune"], max_new_tokens=5)
    assert first == second and len(first) == 2
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 5 for text in first)


def test_sizes_and_table(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("not a weight file")
    weights = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert evaluate.disk_bytes(tmp_path / "m") == weights
    assert evaluate.weight_format(tmp_path / "m", model) == "safetensors float32"
    # What is on disk, not what the model runs in: a bf16 checkpoint loaded in float32.
    slimlm.save_pruned(model, tmp_path / "bf16", save_dtype="bfloat16")
    assert evaluate.weight_format(tmp_path / "bf16", model) == "safetensors bfloat16"
    # Tied embeddings: the LM head is the embedding matrix and counts once.
    assert evaluate.count_params(model) == sum(p.numel() for p in model.parameters())
    assert evaluate.count_params(model) < sum(p.numel() for p in model.state_dict().values())
    blocks = blocks_with_padding()
    results = [evaluate.evaluate_model(model, blocks, spec=tmp_path / "m", name="big", progress=False),
               {**evaluate.evaluate_model(model, blocks, name="half", progress=False),
                "params": evaluate.count_params(model) // 2}]
    table = evaluate.format_table(evaluate.comparison_rows(results))
    assert "big" in table and "50.0%" in table and "100.0%" in table and "safetensors float32" in table
    with pytest.raises(ValueError, match="neither"):
        evaluate.disk_bytes(tmp_path / "missing")
