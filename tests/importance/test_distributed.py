"""Two CPU processes on gloo (torchrun) give the scores of one process."""
import os
import subprocess
import sys

import pytest
import torch

from distributed_worker import scores_of
from slimlm.importance import ImportanceScores

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
def test_two_ranks_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER]
    result = subprocess.run(command + [str(tmp_path / "scores"), "phi3"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    distributed = ImportanceScores.load(tmp_path / "scores")
    single = scores_of("phi3")
    assert distributed.meta["world_size"] == 2 and single.meta["world_size"] == 1
    for field in ("num_samples", "num_tokens", "fingerprint"):
        assert distributed.meta[field] == single.meta[field]
    assert set(distributed.scores) == set(single.scores)
    for key, value in single.scores.items():
        torch.testing.assert_close(distributed.scores[key], value, rtol=1e-5, atol=1e-6, msg=key)
