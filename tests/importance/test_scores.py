"""ImportanceScores helpers: layer choices, summary table, plot."""
import pytest
import torch

from slimlm.importance import ImportanceScores


def depth_scores():
    return ImportanceScores(
        scores={
            "block_influence.layer": torch.tensor([0.9, 0.2, 0.1, 0.3, 0.05, 0.8]),
            "loss_drop.layer": torch.tensor([2.0, 0.1, 0.3, 0.2, 0.4, 1.0]),
            "activation.head": torch.tensor([[1.0, 2.0], [0.5, 3.0]]),
            "activation.hidden": torch.tensor([4.0, 1.0, 2.0]),
        },
        meta={"model_name": "toy", "num_samples": 3},
    )


def test_best_layers_and_contiguous_block():
    scores = depth_scores()
    assert scores.best_layers(2) == [2, 4]  # block influence is the first depth metric
    assert scores.best_layers(3, "loss_drop") == [1, 2, 3]
    # Windows of 3 by block influence: [0.4+..]: (1,2,3)=0.6, (2,3,4)=0.45, (3,4,5)=1.15.
    assert scores.best_contiguous_block(3) == [2, 3, 4]
    assert scores.best_contiguous_block(2, "loss_drop") == [1, 2]
    for bad in (0, 6, 2.0):
        with pytest.raises(ValueError, match="k must be"):
            scores.best_layers(bad)
    with pytest.raises(ValueError, match="no 'magnitude' scores"):
        scores.best_layers(1, "magnitude")


def test_summary_names_every_tensor_and_the_drop_suggestions(capsys):
    text = depth_scores().summary()
    assert capsys.readouterr().out.strip() == text.strip()
    for key in ("block_influence.layer", "loss_drop.layer", "activation.head", "activation.hidden"):
        assert key in text
    assert "L1:0" in text  # the least important head: layer 1, head 0
    assert "least important [2, 4]" not in text  # k = 6 // 4 = 1
    assert "drop 1 by block_influence: least important [4], best contiguous block [4]" in text


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = depth_scores().plot(tmp_path / "plots" / "importance.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
