"""slimlm.fingerprint: a model's identity covers every weight, however the weight changed."""
import torch

from slimlm.fingerprint import model_fingerprint
from tests.tiny import tiny_model


def test_any_weight_changed_in_any_way_is_another_model():
    model = tiny_model("llama", "training")
    original = model_fingerprint(model)
    assert model_fingerprint(model) == original
    down_proj = model.model.layers[-1].mlp.down_proj.weight
    down_proj.data[0, 0] += 1.0  # a .data write: no version-counter bump
    changed = model_fingerprint(model)
    assert changed != original
    optimizer = torch.optim.AdamW([down_proj], lr=0.1, fused=True)  # a fused step: no bump either
    (down_proj ** 2).sum().backward()
    optimizer.step()
    assert model_fingerprint(model) not in (original, changed)


def test_the_fingerprint_in_a_dtype_is_the_reloaded_checkpoints(tmp_path):
    model = tiny_model("llama", "training")
    expected = model_fingerprint(model, torch.bfloat16)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    reloaded = type(model).from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert model_fingerprint(reloaded) == expected != model_fingerprint(model.float())
