"""slimlm.search on tiny models: the zero-shot rank finds deliberately dead units, the
re-rank distills the best, outputs are written and read back on resume, bad input is
refused before any work with the source model untouched."""
from __future__ import annotations

import csv
import importlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm import Budget, SearchSpace, Target, prune, search
from slimlm.architectures import get_adapter
from slimlm.data import TokenBlocks
from slimlm.search import enumerate_shapes

from tiny import ARCHITECTURES, assert_untouched, calibration, random_scores, snapshot, tiny_model

search_module = importlib.import_module("slimlm.search.run")
DEAD = 32  # MLP neurons zeroed in every layer of the tiny model (intermediate 96)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def blocks(count=12, seq=16, seed=1):
    return TokenBlocks(*calibration(batch=count, seq=seq, seed=seed, pad_from={0: 10}, vocab_size=128))


def quiet(*_):
    pass


def dead_neuron_model(model_type):
    """A tiny model whose neurons 0..DEAD-1 contribute nothing (their down-projection columns
    are zero), and scores that rank exactly those lowest."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    with torch.no_grad():
        for layer in adapter.layers(model):
            adapter.mlp(layer).down.weight[:, :DEAD] = 0
    scores = random_scores(model)
    scores.scores["magnitude.neuron"][:, :DEAD] = 0.0
    return model, scores


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_zero_shot_rank_puts_the_candidate_cutting_exactly_the_dead_units_first(model_type):
    model, scores = dead_neuron_model(model_type)
    dead_cut = next(s for s in enumerate_shapes(model) if s.key == "h64-i64-q4-kv2-l4")
    result = search(model, scores, {"target_params": dead_cut.params, "tolerance": 0.1}, blocks(), top_n=20, top_k=0,
                    held_out=4, log=quiet)
    assert len(result.candidates) > 3
    first = result.candidates[0]
    assert first["key"] == dead_cut.key and first["rank"] == 1
    assert first["zero_shot_kd_loss"] < 1e-5 < min(row["zero_shot_kd_loss"] for row in result.candidates[1:])
    assert result.target == Target(hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   num_layers=4)
    assert result.student.config.intermediate_size == 64


def test_search_distills_the_top_k_writes_its_outputs_and_leaves_the_teacher_as_it_was(tmp_path):
    model = tiny_model("qwen3", preset="surgery")
    scores = random_scores(model)
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    out = tmp_path / "search"
    budget = {"target_memory": 300_000, "at_batch": 2, "at_seq": 64, "dtype": "bfloat16", "tolerance": 0.15}
    result = search(model, scores, budget, blocks(), out=out, top_n=5, top_k=2, held_out=4, rerank_tokens=64,
                    batch_size=4, log=quiet)
    assert_untouched(model, before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags and not model.training

    record = json.loads((out / "search.json").read_text())
    fields = {"hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_layers", "params",
              "memory_bytes", "zero_shot_kd_loss", "lm_loss", "distill_loss", "rank"}
    assert len(record["candidates"]) == 5 and all(fields <= set(row) for row in record["candidates"])
    assert [row["rank"] for row in record["candidates"]] == [1, 2, 3, 4, 5]
    assert all(255_000 <= row["memory_bytes"] <= 300_000 for row in record["candidates"])
    distilled = [row for row in record["candidates"] if row["distill_loss"] is not None]
    assert len(distilled) == 2 and record["winner"]["key"] == distilled[0]["key"]
    assert distilled[0]["distill_loss"] <= distilled[1]["distill_loss"]
    assert all(row["distill_loss"] < row["zero_shot_kd_loss"] for row in distilled)  # the short run trained
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert [row["key"] for row in rows] == [row["key"] for row in record["candidates"]]
    assert (out / "search.png").stat().st_size > 1000

    # The winner's Target prunes the source to the winner's shape; its distilled state reloads.
    target = Target.coerce(json.loads((out / "winner_target.json").read_text()))
    assert target == result.target
    pruned = prune(model, scores, target, inplace=False)
    assert sum(p.numel() for p in pruned.parameters()) == result.winner["params"]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "winner").eval()
    input_ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, result.student(input_ids).logits)


def test_a_rerun_reads_finished_candidates_back(tmp_path, monkeypatch):
    model = tiny_model("llama")
    scores = random_scores(model)
    out = tmp_path / "search"
    options = dict(out=out, top_n=4, top_k=1, held_out=4, rerank_tokens=32, batch_size=4, log=quiet)
    first = search(model, scores, {"target_params": 0.8}, blocks(), **options)

    calls = {"score": 0, "distill": 0}
    score, distill = search_module.held_out_losses, search_module.short_distill

    def counting_score(*args, **kwargs):
        calls["score"] += 1
        return score(*args, **kwargs)

    def counting_distill(*args, **kwargs):
        calls["distill"] += 1
        return distill(*args, **kwargs)

    monkeypatch.setattr(search_module, "held_out_losses", counting_score)
    monkeypatch.setattr(search_module, "short_distill", counting_distill)
    again = search(model, scores, {"target_params": 0.8}, blocks(), **options)
    assert calls == {"score": 0, "distill": 0}
    assert again.candidates == first.candidates and again.target == first.target
    assert again.student is not None  # read back from out/winner

    # An interrupted run: one candidate unscored. Only that one is scored again.
    record = json.loads((out / "search.json").read_text())
    last = record["candidates"][-1]
    last["zero_shot_kd_loss"] = last["lm_loss"] = None
    (out / "search.json").write_text(json.dumps(record))
    resumed = search(model, scores, {"target_params": 0.8}, blocks(), **options)
    assert calls == {"score": 1, "distill": 0}
    assert resumed.candidates == first.candidates

    with pytest.raises(ValueError, match="other inputs"):
        search(model, scores, {"target_params": 0.8}, blocks(seed=2), **options)


def bad_inputs():
    model = tiny_model("llama")
    scores = random_scores(model)
    other = tiny_model("llama", seed=5)
    return model, scores, {
        "unreachable budget": (dict(target={"target_params": 0.05}), "smallest the search space allows"),
        "nothing to prune": (dict(target={"target_params": 10**9}), "nothing to prune"),
        "memory without batch/seq": (dict(target={"target_memory": "1MiB"}), "at_batch and at_seq"),
        "K over the candidates": (dict(top_n=50, top_k=40), "only .* candidate"),
        "K over N": (dict(top_n=2, top_k=3), "top_k=3 is larger than top_n=2"),
        "too little data": (dict(data=blocks(count=1)), "too small for the held-out split"),
        "scores of another model": (dict(scores=random_scores(other)), "not on this model"),
        "no scores": (dict(scores=None), "needs the model's importance scores"),
        "unknown space field": (dict(space={"max_prune": 0.5}), "unknown search space field"),
        "bad space": (dict(space=SearchSpace(depth_selections=("middle",))), "depth_selections"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()[2]))
def test_bad_input_is_refused_before_any_work(case, tmp_path, monkeypatch):
    model, scores, cases = bad_inputs()
    overrides, message = cases[case]
    before = snapshot(model)

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(search_module, "teacher_states", no_work)
    monkeypatch.setattr(search_module, "prune", no_work)
    arguments = dict(scores=scores, target={"target_params": 0.8}, data=blocks(), top_n=4, top_k=1, held_out=4)
    arguments.update(overrides)
    out = tmp_path / "search"
    with pytest.raises(ValueError, match=message):
        search(model, arguments.pop("scores"), arguments.pop("target"), arguments.pop("data"), out=out, log=quiet,
               **arguments)
    assert_untouched(model, before)
    assert not out.exists()


def test_budget_objects_and_a_contiguous_block_space_search():
    model = tiny_model("mistral")
    scores = random_scores(model)
    space = {"max_width_prune": 0.5, "max_depth_prune": 0.5, "depth_selections": ["contiguous_block"]}
    result = search(model, scores, Budget(target_params=0.6), blocks(), space=space, top_n=6, top_k=0, held_out=4,
                    log=quiet)
    shallow = [row for row in result.candidates if row["num_layers"] < 4]
    assert all(row["depth_selection"] == "contiguous_block" for row in shallow)
    if result.winner["num_layers"] < 4:
        dropped = result.target.drop_layers
        assert dropped == list(range(dropped[0], dropped[0] + len(dropped)))


def test_a_rank_other_than_0_scores_its_share_and_writes_nothing(tmp_path, monkeypatch):
    """As rank 1 of 2 (the process group stubbed; the real one: tests/cli/test_search.py):
    zero-shot scores rows[1::2] only, takes the rest from the gather, ranks as one process
    does, and writes nothing."""
    model = tiny_model("llama")
    scores = random_scores(model)
    options = dict(top_n=5, top_k=1, held_out=4, rerank_tokens=32, batch_size=4, log=quiet)
    single = search(model, scores, {"target_params": 0.8}, blocks(), **options)
    by_key = {row["key"]: row for row in single.candidates}
    scored_here = []

    def gather(rows, rank, world):
        assert (rank, world) == (1, 2)
        scored_here.extend(row["key"] for row in rows if row["zero_shot_kd_loss"] is not None)
        for row in rows[0::2]:  # rank 0's share
            row["zero_shot_kd_loss"], row["lm_loss"] = by_key[row["key"]]["zero_shot_kd_loss"], by_key[row["key"]]["lm_loss"]

    monkeypatch.setattr(search_module, "_process_group", lambda: (1, 2))
    monkeypatch.setattr(search_module, "_gather_losses", gather)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: None)
    out = tmp_path / "search"
    rank_one = search(model, scores, {"target_params": 0.8}, blocks(), out=out, **options)
    in_order = [c.key for c in search_module.fitting(enumerate_shapes(model), search_module.Budget(target_params=0.8),
                                                     sum(p.numel() for p in model.parameters()))[1][:5]]
    assert scored_here == in_order[1::2]
    assert rank_one.candidates == single.candidates and rank_one.target == single.target
    assert not out.exists()

    monkeypatch.setattr(search_module, "_process_group", lambda: (0, 3))
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by the 3 processes"):
        search(model, scores, {"target_params": 0.8}, blocks(), **options)
