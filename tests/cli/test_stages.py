"""The stage protocol: one loop (``run_stage``) skips, runs, logs and times every stage; a run can
stop after any stage; a new stage is one class added to ``Pipeline.stages``."""
import dataclasses
import json
import os

import pytest

from slimlm.pipeline import Pipeline, RunContext, Stage, load_recipe, run_stage

from .helpers import write_recipe


class Counter(Stage):
    """A stage that writes ``count.json`` holding its input; stale when the input differs."""

    name, output = "count", "count.json"

    def __init__(self, value=1):
        self.value, self.runs = value, 0

    def inputs(self, ctx, done):
        return {"value": self.value}

    def stale_reason(self, ctx, inputs):
        path = ctx.path(self.output)
        if not os.path.isfile(path):
            return "missing"
        return None if json.loads(open(path).read()) == inputs else "made from other inputs"

    def run(self, ctx, done, inputs):
        self.runs += 1
        with open(ctx.path(self.output), "w") as handle:
            json.dump(inputs, handle)
        return "ran"

    def load(self, ctx, done):
        return "loaded"


def context(tmp_path, lines, **changes):
    fields = {field.name: None for field in dataclasses.fields(RunContext)}
    fields.update(recipe={}, out=str(tmp_path), log=lines.append, progress=False, started=0.0)
    fields.update(changes)
    return RunContext(**fields)


def test_run_stage_runs_a_missing_output_then_loads_it_and_reruns_when_an_input_changes(tmp_path):
    lines, done, timings = [], {}, {}
    ctx = context(tmp_path, lines)
    stage = Counter()
    assert run_stage(stage, ctx, done, timings) == "ran" and done["count"] == "ran" and "count" in timings
    assert lines[-1] == "[count] running (count.json: missing)"
    assert run_stage(stage, ctx, done, timings) == "loaded" and stage.runs == 1
    assert lines[-1] == f"[count] skipped: {tmp_path / 'count.json'} is already done"
    assert run_stage(Counter(2), ctx, done, timings) == "ran"
    assert lines[-1] == "[count] running (count.json: made from other inputs)"


def test_a_stage_the_recipe_leaves_out_gives_its_absent_value_and_is_not_timed(tmp_path):
    class Optional(Counter):
        def wanted(self, ctx):
            return False

        def absent(self, ctx, done):
            return "absent"

    lines, done, timings = [], {}, {}
    assert run_stage(Optional(), context(tmp_path, lines), done, timings) == "absent"
    assert done == {"count": "absent"} and timings == {} and lines == []


def test_the_context_is_frozen(tmp_path):
    ctx = context(tmp_path, [])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.out = "elsewhere"


def test_a_run_stops_after_a_named_stage_and_a_new_stage_is_one_class(workspace):
    """``run(until=...)`` returns the values so far (the importance scores, without pruning);
    a subclass that adds a stage to ``stages`` gets it run, logged and timed in order."""
    recipe = load_recipe(write_recipe(workspace, name="stages.yaml", out="stages-run"))
    lines = []
    done = Pipeline(recipe, progress=False, log=lines.append).run(until="importance")
    assert list(done) == ["tokenize", "importance"] and done["importance"].meta["fingerprint"]
    assert done["tokenize"]["train"].num_tokens > 0 and "general" not in done["tokenize"]
    assert not (workspace / "stages-run" / "pruned").exists()

    added = Counter()

    class WithCount(Pipeline):
        def stages(self):
            stages = super().stages()
            return stages[:2] + (added,) + stages[2:]

    pipeline = WithCount(recipe, progress=False, log=lines.append)
    done = pipeline.run(until="prune")
    assert list(done) == ["tokenize", "importance", "count", "search", "prune"] and done["count"] == "ran"
    assert "[tokenize] skipped" in "\n".join(lines) and "[importance] skipped" in "\n".join(lines)
    assert "count" in pipeline.timings
    assert json.loads((workspace / "stages-run" / "count.json").read_text()) == {"value": 1}


def test_a_stage_that_compares_its_output_must_say_how_and_read_it_back():
    with pytest.raises(TypeError, match="stage Half compares and reads back its output, so it defines load"):
        class Half(Stage):  # noqa: F841
            def stale_reason(self, ctx, inputs):
                return None

            def run(self, ctx, done, inputs):
                return None

    class EveryRun(Stage):  # a report-like stage needs neither
        every_run = True

        def run(self, ctx, done, inputs):
            return "made"

    assert EveryRun().run(None, {}, None) == "made"
    with pytest.raises(TypeError):
        Stage()
