"""``slimlm importance``: scores written with a record of what they were computed from."""
import json

from .helpers import scores_dir


def test_importance_writes_scores(workspace, capsys):
    out = scores_dir(workspace, capsys)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_samples"] == 8 and meta["depth"] == ["block_influence", "loss_drop"]
