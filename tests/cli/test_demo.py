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
    assert "report:" in result.stdout
