"""``slimlm importance``: scores written with a record of what they were computed from."""
import json

import pytest
import torch

from slimlm import estimate_importance, load_model, load_tokenizer
from slimlm.data import load_texts, tokenize_blocks
from slimlm.fingerprint import model_fingerprint
from slimlm.importance import ImportanceScores

from .helpers import scores_dir


def test_importance_writes_scores(workspace, capsys):
    """meta.json names the model and says how the scores were made, and the saved scores are
    those ``estimate_importance`` gives on the same 8 calibration blocks (16 tokens each)."""
    out = scores_dir(workspace, capsys)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 8 and meta["depth"] == ["block_influence", "loss_drop"]

    teacher = load_model(workspace / "teacher", dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(workspace / "teacher")
    texts = load_texts(str(workspace / "data" / "*.txt"))
    blocks = tokenize_blocks(texts, tokenizer, 16, model=teacher).sample(8, seed=0)
    assert meta["fingerprint"] == model_fingerprint(teacher)
    assert meta["model_type"] == "llama" and meta["metrics"] == ["activation"]
    assert meta["num_tokens"] == int(blocks.attention_mask.sum()) and meta["world_size"] == 1
    assert meta["loss_drop_samples"] == 8

    reference = estimate_importance(teacher, blocks, metrics=("activation",), depth=("block_influence", "loss_drop"),
                                    progress=False)
    assert meta["calibration_loss"] == pytest.approx(reference.meta["calibration_loss"], rel=1e-5)
    saved = ImportanceScores.load(out, model=teacher)
    assert sorted(saved.scores) == sorted(reference.scores)
    shapes = {"head": (2, 4), "kv_group": (2, 2), "neuron": (2, 128), "hidden": (64,), "layer": (2,)}
    for key, expected in reference.scores.items():
        assert tuple(saved.scores[key].shape) == shapes[key.split(".")[1]], key
        torch.testing.assert_close(saved.scores[key], expected, rtol=1e-5, atol=1e-6, msg=key)
