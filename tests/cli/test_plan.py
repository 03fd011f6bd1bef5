"""``slimlm plan``: the dry run prints the plan and writes nothing; targets it refuses."""
import json
import os

import pytest

from .helpers import one_line_error, run_cli


def test_plan_prints_the_table_and_writes_nothing(workspace, capsys):
    before = sorted(os.listdir(workspace / "teacher"))
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5", "--json")
    assert code == 0
    assert "params.total" in out and "weights in memory" in out
    plan = json.loads(out[out.index("{"):])
    assert plan["params_after"]["total"] <= 0.5 * plan["params_before"]["total"]
    assert sorted(os.listdir(workspace / "teacher")) == before


def test_plan_counts_the_bytes_of_the_dtype_it_loaded(workspace, capsys):
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5")
    assert code == 0 and "at 4 bytes/parameter" in out  # auto is float32 on CPU
    code, out, _ = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", "0.5",
                           "--dtype", "bfloat16")
    assert code == 0 and "at 2 bytes/parameter" in out


@pytest.mark.parametrize("value, message", [
    ("inf", "expected a fraction in (0, 1] or a parameter count"), ("nan", "expected a fraction"),
    ("1.5", "a fraction must be in (0, 1] and a count a whole number"),
    ("2", "asks for 2 parameters: cannot reach that"), ("0", "expected a fraction"),
])
def test_target_params_that_are_neither_a_fraction_nor_a_reachable_count(workspace, capsys, value, message):
    code, _, err = run_cli(capsys, "plan", "--model", workspace / "teacher", "--target-params", value)
    assert message in one_line_error(code, err, "plan")
