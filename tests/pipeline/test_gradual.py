"""Gradual pruning (``slimlm.pipeline.gradual``, ``slimlm.search.schedule``): the schedule's pure
rules, and a two-step run on a tiny six-layer Llama whose widths are pinned, so that each step
cuts depth only and the final budget has exactly one shape. That run is interrupted once in
step 2's distillation and rerun: the rerun reads step 1 back and continues step 2."""
import json
import os
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.distill.options import DistillOptions
from slimlm.errors import InputError
from slimlm.evaluate import EvalOptions, count_params
from slimlm.importance.options import ImportanceOptions
from slimlm.pipeline import gradual
from slimlm.search import SearchOptions
from slimlm.search.schedule import ScheduleOptions, check_not_grown, compose_layer_maps, split_tokens, step_budgets
from slimlm.surgery.save import RECORD_FILE as PRUNE_RECORD
from tests.cli.helpers import sentences
from tests.tiny import random_scores, tiny_model, word_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 6
# Every width at its full size: the search can only drop layers.
PINNED = {"hidden_size": 32, "intermediate_size": 64, "heads_per_group": 2, "num_key_value_heads": 2}


def teacher_model(tokenizer):
    return tiny_model("llama", "training", vocab_size=len(tokenizer), num_hidden_layers=LAYERS)


def params_at(teacher, layers: int) -> int:
    per_layer = sum(parameter.numel() for parameter in teacher.model.layers[0].parameters())
    return count_params(teacher) - (LAYERS - layers) * per_layer


def settings(teacher):
    """gradual_prune's keywords for two depth cuts, 6 -> 5 -> 4 layers."""
    total = count_params(teacher)
    return dict(
        target={"target_params": params_at(teacher, 4), "tolerance": 0.05},
        schedule=ScheduleOptions(step_budgets=[params_at(teacher, 5) / total, params_at(teacher, 4) / total]),
        search=SearchOptions(top_n=1, top_k=1, num_blocks=12, seq_len=16, held_out=4, rerank_tokens=32, batch_size=4,
                             space={"max_depth_prune": 0.5, "min_sizes": PINNED}),
        distill=DistillOptions(seq_len=16, batch_size=4, max_tokens=384, lr=1e-3, hidden_loss_weight=1.0),
        importance=ImportanceOptions(num_samples=8, seq_len=16, batch_size=4, depth=["block_influence"]),
        evaluation=EvalOptions(seq_len=16, max_blocks=4), training_args=["--use_cpu", "true"], progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The two-step run, interrupted in step 2's distillation, then rerun with the calls counted."""
    tokenizer = word_tokenizer()
    teacher = teacher_model(tokenizer)
    out = tmp_path_factory.mktemp("gradual") / "out"
    texts, heldout = sentences(80, 1), {"heldout": sentences(10, 99)}
    first, second, calls = [], [], {"distill": [], "importance": 0, "prune": 0}
    real_distill = gradual.distill_stage
    import slimlm.pipeline.importance as importance_module
    import slimlm.pipeline.prune as prune_module

    def interrupted(*args, **kwargs):
        if os.path.basename(args[4]) == "step-2":
            raise KeyboardInterrupt
        return real_distill(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradual, "distill_stage", interrupted)
        with pytest.raises(KeyboardInterrupt):
            gradual.gradual_prune(teacher, tokenizer, texts, out, heldout=heldout, log=first.append,
                                  **settings(teacher))
    step_1 = out / "steps" / "step-1"
    before = {name: (step_1 / name).stat().st_mtime_ns for name in os.listdir(step_1)}

    def counted(name, function):
        def call(*args, **kwargs):
            calls[name] = calls[name] + 1
            return function(*args, **kwargs)
        return call

    def counted_distill(*args, **kwargs):
        calls["distill"].append(os.path.basename(args[4]))
        return real_distill(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradual, "distill_stage", counted_distill)
        patch.setattr(importance_module, "importance_stage", counted("importance", importance_module.importance_stage))
        patch.setattr(prune_module, "prune_stage", counted("prune", prune_module.prune_stage))
        record = gradual.gradual_prune(teacher, tokenizer, texts, out, heldout=heldout, log=second.append,
                                       **settings(teacher))
    return types.SimpleNamespace(teacher=teacher, out=out, record=record, first=first, second=second, calls=calls,
                                 step_1_before=before)


def test_two_steps_land_exactly_on_the_final_budgets_shape_and_count(run):
    final = params_at(run.teacher, 4)
    record = run.record
    assert record["budgets"] == [params_at(run.teacher, 5), final] and record["final"] == "steps/step-2"
    assert [step["shape"]["num_layers"] for step in record["steps"]] == [5, 4]
    student = AutoModelForCausalLM.from_pretrained(run.out / record["final"])
    assert count_params(student) == record["steps"][-1]["params"] == final
    config = student.config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.num_hidden_layers) == (32, 64, 4, 2, 4)
    # Each step's tokens: its share, of which the search winner's re-ranking trained 64.
    shares = record["token_shares"]
    assert sum(shares) == 384 and [step["tokens"]["cumulative"] for step in record["steps"]] == [shares[0], 384]
    assert all(step["tokens"]["rerank"] == 64 for step in record["steps"])
    assert set(record["steps"][0]["perplexity"]["step"]) == {"heldout"}


def test_each_step_saves_an_ordinary_checkpoint_with_its_done_record(run):
    tokenizer = word_tokenizer()
    ids = torch.tensor([tokenizer.encode("the model is small .")])
    for step, layers in ((1, 5), (2, 4)):
        folder = run.out / "steps" / f"step-{step}"
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == layers
        assert torch.isfinite(model(ids).logits).all()
        done = json.loads((folder / gradual.STEP_RECORD).read_text())
        assert done["step"] == step and done["student"] == gradual.weights_digest(str(folder))


def test_the_layer_map_after_two_depth_cuts_points_at_the_teacher_layers(run):
    kept = [json.loads((run.out / "steps" / f"step-{step}.work" / "pruned" / PRUNE_RECORD).read_text())["kept_layers"]
            for step in (1, 2)]
    assert len(kept[0]) == 5 and len(kept[1]) == 4
    teacher_layers = [kept[0][index] for index in kept[1]]
    step = run.record["steps"][1]
    assert step["teacher_layers"] == teacher_layers
    expected = {str(index + 1): layer + 1 for index, layer in enumerate(teacher_layers)}
    assert step["layer_map"] == expected
    # The hidden-state loss of step 2's distillation used it.
    distilled = json.loads((run.out / "steps" / "step-2" / "slimlm_distill.json").read_text())
    assert distilled["inputs"]["distillation_options"]["layer_map"] == expected


def test_an_interrupted_step_2_resumes_there_and_step_1_is_read_back(run):
    assert any(line.startswith("[gradual] step 2: distilling") for line in run.first)
    assert any(line.startswith("[gradual] step 1: steps/step-1 is already done") for line in run.second)
    # Nothing of step 1 is done again, and step 2's scores, search and cut are read back.
    assert run.calls == {"distill": ["step-2"], "importance": 0, "prune": 0}
    assert any("zero-shot scored by an earlier run" in line for line in run.second)
    step_1 = run.out / "steps" / "step-1"
    assert {name: (step_1 / name).stat().st_mtime_ns for name in os.listdir(step_1)} == run.step_1_before


def test_the_report_lines_show_each_step_and_the_perplexity_curve(run):
    lines = gradual.gradual_report_lines(run.record)
    assert lines[0] == "## Gradual pruning"
    table = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and "h32-i64-q4-kv2-l5" in table[0] and "h32-i64-q4-kv2-l4" in table[1]
    curve = lines.index("Held-out perplexity against cumulative distillation tokens (re-ranking tokens included):")
    points = lines[curve + 4:]
    first = f"{run.record['token_shares'][0]:,}"
    assert [line.split("|")[1].strip() for line in points] == ["0", first, first, "384"]
    assert [line.split("|")[2].strip() for line in points] == ["step 1 cut", "after step 1", "step 2 cut",
                                                                "after step 2"]


def test_a_run_of_other_inputs_in_the_folder_is_refused_unless_replaced(tmp_path):
    tokenizer = word_tokenizer()
    teacher = teacher_model(tokenizer)
    out = tmp_path / "other"
    (out / "steps").mkdir(parents=True)
    (out / gradual.RECORD_FILE).write_text(json.dumps({"inputs": {"teacher": "another"}}))
    with pytest.raises(InputError, match="holds a gradual run of other inputs .*teacher.*pass --overwrite"):
        gradual.gradual_prune(teacher, tokenizer, sentences(80, 1), out, **settings(teacher))


# ------------------------------------------------------------ pure rules
def test_step_budgets_are_geometric_or_given_and_end_on_the_target():
    assert step_budgets(1000, 250, 2) == [500, 250]
    assert step_budgets(1000, 125, 3) == [500, 250, 125]
    assert step_budgets(1000, 500, 2, [0.8, 0.5]) == [800, 500]
    with pytest.raises(InputError, match=r"^schedule.step_budgets: the last step's budget 0.6 .* is not the final"):
        step_budgets(1000, 500, 2, [0.8, 0.6])
    with pytest.raises(InputError, match="do not decrease strictly"):
        step_budgets(1000, 500, 3, [0.4, 0.45, 0.5])
    with pytest.raises(InputError, match="gives 3 fractions for 2 steps"):
        step_budgets(1000, 500, 2, [0.9, 0.7, 0.5])


def test_tokens_split_even_back_front_or_by_fractions_and_never_to_zero():
    assert split_tokens(900, 3) == [300, 300, 300]
    assert split_tokens(600, 3, "back") == [100, 200, 300]
    assert split_tokens(600, 3, "front") == [300, 200, 100]
    assert split_tokens(1000, 2, [0.25, 0.75]) == [250, 750]
    assert sum(split_tokens(1001, 3, "back")) == 1001
    with pytest.raises(InputError, match="^schedule: step 1 of 3 gets 0 of the 2 distillation tokens"):
        split_tokens(2, 3, "back")


def test_a_step_never_grows_a_dimension():
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
             "num_layers": 4}
    check_not_grown(shape, {**shape, "num_layers": 3, "intermediate_size": 96})
    with pytest.raises(InputError, match=r"^schedule: step 2 would grow intermediate_size 128 -> 160; a step never"):
        check_not_grown(shape, {**shape, "intermediate_size": 160}, 2)
    # Fewer KV groups of wider groups: the heads per group grow, though the heads do not.
    with pytest.raises(InputError, match="heads_per_group 2 -> 4"):
        check_not_grown(shape, {**shape, "num_key_value_heads": 1})


def test_layer_maps_compose_through_the_intermediate_model():
    from slimlm.losses import depth_layer_map

    first = depth_layer_map(4, 6, [0, 2, 3, 5])      # teacher layers kept by the first cut
    second = depth_layer_map(2, 4, [1, 3])           # the intermediate's layers kept by the second
    assert compose_layer_maps(first, second) == {1: 3, 2: 6}  # teacher layers 2 and 5
    with pytest.raises(ValueError, match=r"names intermediate layers \[5\]"):
        compose_layer_maps(first, {1: 5})


@pytest.mark.parametrize("fields, message", [
    ({"steps": 1}, "^steps must be >= 2"),
    ({"token_split": [0.5, 0.0]}, "^token_split gives a step no tokens"),
    ({"token_split": [0.3, 0.3]}, "^token_split fractions sum to 0.6, not 1"),
    ({"token_split": ["even", "back"]}, "^token_split: 'even' is neither a rule"),
    ({"step_budgets": [0.5, 0.7]}, r"^step_budgets must decrease strictly \(a step never grows\)"),
    ({"step_budgets": [0.8, 0.6, 0.5]}, "^step_budgets gives 3 fractions for steps 2"),
    ({"step_budgets": [1.2, 0.5]}, r"^step_budgets fractions must be in \(0, 1\)"),
])
def test_bad_schedules_are_refused_with_one_line(fields, message):
    with pytest.raises(InputError, match=message):
        ScheduleOptions(**fields)


def test_the_plan_refuses_what_no_run_could_do():
    tokenizer = word_tokenizer()
    teacher = teacher_model(tokenizer)
    base = settings(teacher)
    plan = gradual.schedule_plan(teacher, base["target"], base["schedule"], base["search"], 384, train_blocks=8)
    assert plan.budgets == [params_at(teacher, 5), params_at(teacher, 4)] and plan.rerank == 64
    assert plan.space.min_sizes == {**PINNED, "num_layers": 3}
    cases = [
        (dict(max_tokens=None), "schedule: the steps share distill.max_tokens"),
        (dict(max_tokens=100), r"step 1's share of 50 distillation tokens does not cover its search's re-ranking"),
        (dict(target={"target_memory": "1MB", "at_batch": 1, "at_seq": 8}), "give target.target_params"),
        (dict(schedule=ScheduleOptions(steps=2)), "step 1 .* no legal shape is within tolerance"),
        (dict(schedule=ScheduleOptions(steps=2, step_budgets=[0.9, 0.6])), "is not the final target"),
        (dict(target={"target_params": params_at(teacher, 4), "tolerance": 0.3}), "within the tolerance 0.3 of step 1"),
    ]
    for change, message in cases:
        args = {"target": base["target"], "schedule": base["schedule"], "max_tokens": 384, **change}
        with pytest.raises(InputError, match=message):
            gradual.schedule_plan(teacher, args["target"], args["schedule"], base["search"], args["max_tokens"],
                                  train_blocks=8)


def test_carried_scores_are_the_scores_of_the_units_a_cut_kept():
    from slimlm.architectures import model_sizes
    from slimlm.surgery import plan, prune
    from slimlm.surgery.selection import select_units

    teacher = tiny_model("llama")
    scores = random_scores(teacher)
    the_plan = plan(teacher, {"hidden_size": 48, "intermediate_size": 64, "num_attention_heads": 2,
                              "num_key_value_heads": 1, "num_layers": 3})
    selection = select_units(scores, model_sizes(teacher.config), the_plan.sizes_after, None, "least_important")
    pruned = prune(teacher, scores, the_plan, inplace=False)
    carried = gradual.carried_scores(scores, selection, "cut")
    assert carried.meta["fingerprint"] == "cut"
    layers = selection.kept_layers
    assert torch.equal(carried.get("layer"), scores.get("layer")[layers])
    assert torch.equal(carried.get("hidden"), scores.get("hidden")[selection.hidden])
    assert carried.get("neuron").shape == (3, 64) and carried.get("head").shape == (3, 2)
    assert carried.get("kv_group").shape == (3, 1)
    for row, layer in enumerate(layers):
        assert torch.equal(carried.get("neuron")[row], scores.get("neuron")[layer][selection.neurons[layer]])
        assert torch.equal(carried.get("head")[row], scores.get("head")[layer][selection.heads[layer]])
    # The cut model's shapes are the carried scores' (what select_units checks on the next cut).
    sizes = model_sizes(pruned.config)
    assert carried.get("neuron").shape == (sizes["num_layers"], sizes["intermediate_size"])


def test_the_steps_share_the_minutes_as_they_share_the_tokens():
    import time
    from types import SimpleNamespace

    from slimlm.pipeline.gradual import _GradualRun

    lines = []
    run = SimpleNamespace(distill=SimpleNamespace(max_minutes=10.0), plan=SimpleNamespace(shares=[1000, 3000]),
                          clock=time.monotonic() - 60, log=lines.append)
    assert _GradualRun.step_minutes(run, 1) == pytest.approx(1.5, abs=0.01)  # a quarter of 10, less the minute gone
    assert _GradualRun.step_minutes(run, 2) == pytest.approx(9.0, abs=0.01)
    assert "25% of distill.max_minutes 10" in lines[0]
    run.clock = time.monotonic() - 300  # step 1's search overran its share: it still distills a minute
    assert _GradualRun.step_minutes(run, 1) == 1.0
    run.distill.max_minutes = None
    assert _GradualRun.step_minutes(run, 1) is None
