"""``slimlm demo --quick`` on the real SmolLM2 model (slow)."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_on_the_real_model(tmp_path):
    pytest.importorskip("gguf")
    result = subprocess.run([sys.executable, "-m", "slimlm", "demo", "--quick", "--out", str(tmp_path / "demo"),
                             "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = {r["name"]: r for r in json.loads((tmp_path / "demo" / "eval.json").read_text())["results"]}
    assert evaluation["pruned"]["params"] < 0.55 * evaluation["teacher"]["params"]
    # Even the smoke-test budget must recover part of what pruning broke.
    assert evaluation["distilled"]["perplexity"] < evaluation["pruned"]["perplexity"]
    assert (tmp_path / "demo" / "report" / "report.html").is_file()
    # Saved in the teacher's source dtype (bf16): at most 0.55x the teacher's bf16 weights (2 bytes a parameter).
    assert json.loads((tmp_path / "demo" / "distilled" / "config.json").read_text())["dtype"] == "bfloat16"
    assert evaluation["distilled"]["disk_bytes"] <= 0.55 * 2 * evaluation["teacher"]["params"]
    speed = json.loads((tmp_path / "demo" / "speed.json").read_text())["report"]
    assert list(speed["models"]) == ["teacher", "distilled"]
    assert "## Inference speed" in (tmp_path / "demo" / "report" / "report.md").read_text()
    assert "report:" in result.stdout
