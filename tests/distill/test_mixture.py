"""slimlm.distill.mixture: Sheared-LLaMA's dynamic batch loading — the weight update, the mixture
that draws each batch from one source with the weights in force at it, and the callback that
moves weight to where the student lags its teacher, replayed exactly by a resumed run."""
import json
import math

import numpy as np
import pytest
import torch
import transformers

from slimlm.distill.mixture import SourceMixture, dynamic_mix_callback, reference_losses, update_weights
from slimlm.distill.trainer import DistillationTrainer
from slimlm.errors import InputError
from tests.tiny import fit, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 64, 16


# ---- update_weights -------------------------------------------------------------------------

def test_update_by_hand_computed_values():
    # α = (0.5, 0.5·3) → (0.25, 0.75); smoothed by 0.1 with the uniform 0.5: (0.275, 0.725).
    new = update_weights({"a": 0.5, "b": 0.5}, {"a": 0.0, "b": math.log(3)}, smoothing=0.1)
    assert new == pytest.approx({"a": 0.275, "b": 0.725}, abs=1e-12)
    # A negative excess counts as 0; the step size scales the excess.
    assert update_weights({"a": 0.5, "b": 0.5}, {"a": -2.0, "b": math.log(9)}, step_size=0.5, smoothing=0.1) == \
        pytest.approx({"a": 0.275, "b": 0.725}, abs=1e-12)
    # α = (0.2, 0.3, 0.5·4) → (0.08, 0.12, 0.8); capped at 0.5, a and b share the other half 2:3.
    three = ({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": 0.0, "b": 0.0, "c": math.log(4)})
    assert update_weights(*three, smoothing=0.0) == pytest.approx({"a": 0.08, "b": 0.12, "c": 0.8})
    assert update_weights(*three, smoothing=0.0, max_weight=0.5) == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5})
    # a raised to 0.1; b and c share 0.9 as 0.12 : 0.8.
    assert update_weights(*three, smoothing=0.0, min_weight=0.1) == \
        pytest.approx({"a": 0.1, "b": 0.9 * 0.12 / 0.92, "c": 0.9 * 0.8 / 0.92})


def test_zero_excess_keeps_the_weights_up_to_the_smoothing():
    weights = {"a": 0.1, "b": 0.6, "c": 0.3}
    assert update_weights(weights, {"a": 0.0, "b": -1.0, "c": 0.0}, smoothing=0.0) == pytest.approx(weights)
    assert update_weights(weights, dict.fromkeys(weights, 0.0)) == \
        pytest.approx({name: (1 - 1e-4) * w + 1e-4 / 3 for name, w in weights.items()})


@pytest.mark.parametrize("seed", range(20))
def test_updated_weights_are_a_distribution_within_the_bounds(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    names = [f"s{i}" for i in range(k)]
    weights = dict(zip(names, rng.dirichlet(np.full(k, 0.3)).tolist()))
    excess = dict(zip(names, (rng.normal(size=k) * 5).tolist()))
    low, high = 0.5 / k * rng.random(), 1 / k + (1 - 1 / k) * rng.random()
    new = update_weights(weights, excess, step_size=float(rng.random() * 3), min_weight=low, max_weight=high)
    assert list(new) == names and sum(new.values()) == pytest.approx(1.0)
    assert all(low - 1e-12 <= w <= high + 1e-12 for w in new.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights={"a": 1.0}, excess={"b": 0.0}), "must name exactly the sources 'a': missing 'a'; unknown 'b'"),
    (dict(weights={"a": -1.0, "b": 2.0}, excess={"a": 0.0, "b": 0.0}), r"weights\['a'\] must be a finite number >= 0"),
    (dict(weights={"a": 0.5, "b": 0.5}, excess={"a": math.nan, "b": 0.0}), r"excess\['a'\] must be a finite number"),
    (dict(weights={"a": 0.5, "b": 0.5}, excess={"a": 0.0, "b": 0.0}, max_weight=0.4), r"no 2 weights in \[0.0, 0.4\]"),
    (dict(weights={"a": 0.5, "b": 0.5}, excess={"a": 0.0, "b": 0.0}, smoothing=2.0), r"smoothing must be in \[0, 1\]"),
])
def test_bad_update_inputs_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        update_weights(kwargs.pop("weights"), kwargs.pop("excess"), **kwargs)


# ---- SourceMixture --------------------------------------------------------------------------

def tagged(tag: int, n: int) -> list[dict]:
    """Items whose input_ids are (tag, position): which source and which item an item is."""
    return [{"input_ids": torch.tensor([tag, i])} for i in range(n)]


def read(mixture, indices=None) -> list[tuple[int, int]]:
    indices = range(len(mixture)) if indices is None else indices
    return [tuple(mixture[i]["input_ids"].tolist()) for i in indices]


def three_sources(**kwargs) -> SourceMixture:
    kwargs = {"batch_size": 2, "num_items": 2 * 1500, "seed": 3, **kwargs}
    return SourceMixture({"a": tagged(0, 50), "b": tagged(1, 7), "c": tagged(2, 300)},
                         kwargs.pop("weights", {"a": 0.2, "b": 0.3, "c": 0.5}), **kwargs)


def test_the_mixture_is_deterministic_under_its_seed_and_independent_of_the_read_order():
    first = three_sources()
    items = read(first)
    backwards = list(reversed(range(len(first))))
    assert read(three_sources(), backwards) == items[::-1]
    scattered = np.random.default_rng(0).choice(len(first), 300, replace=False).tolist()
    assert read(three_sources(), scattered) == [items[i] for i in scattered]
    assert read(three_sources(seed=4), range(200)) != items[:200]


def test_batches_are_homogeneous_and_follow_the_weights():
    mixture = three_sources()
    items = read(mixture)
    size = mixture.batch_size
    batches = [items[b * size:(b + 1) * size] for b in range(mixture.num_batches)]
    assert all(len({tag for tag, _ in batch}) == 1 for batch in batches)
    assert [batch[0][0] for batch in batches] == ["abc".index(mixture.source_at(b)) for b in range(len(batches))]
    shares = np.bincount([batch[0][0] for batch in batches], minlength=3) / len(batches)
    # 1500 batches: one standard deviation of a share is below 0.013.
    assert shares == pytest.approx([0.2, 0.3, 0.5], abs=0.04)


def test_each_source_is_walked_without_repeats_until_it_is_used_up():
    items = read(three_sources())
    for tag, size in ((0, 50), (1, 7), (2, 300)):
        walk = [i for t, i in items if t == tag]
        for start in range(0, len(walk) - size + 1, size):
            assert sorted(walk[start:start + size]) == list(range(size))


def test_new_weights_change_only_the_batches_from_their_start():
    mixture = three_sources()
    before = read(mixture)
    start, size = 1200, mixture.batch_size  # in the second span of 1024 batches, already drawn
    mixture.set_weights({"a": 0.0, "b": 0.0, "c": 1.0}, from_batch=start)
    after = read(mixture)
    assert after[:start * size] == before[:start * size]
    assert {tag for tag, _ in after[start * size:]} == {2}
    assert mixture.weights_at(start - 1) == pytest.approx({"a": 0.2, "b": 0.3, "c": 0.5})
    assert mixture.weights_at(start) == {"a": 0.0, "b": 0.0, "c": 1.0}
    # c's walk goes on where it stood at batch 1200: its items are those it would have drawn next.
    c_before = [i for t, i in before[:start * size] if t == 2]
    c_after = [i for t, i in after if t == 2]
    assert c_after[:len(c_before)] == c_before and len(c_after) > len(c_before)
    # Setting weights at an earlier batch replaces the later settings.
    mixture.set_weights({"a": 1.0, "b": 1.0, "c": 2.0}, from_batch=10)
    assert [start for start, _ in mixture.history] == [0, 10]
    assert read(mixture)[:40] == before[:40]


def test_the_state_round_trips_through_json():
    mixture = three_sources()
    mixture.set_weights({"a": 1.0, "b": 0.0, "c": 1.0}, from_batch=700)
    mixture.set_weights({"a": 0.1, "b": 0.8, "c": 0.1}, from_batch=1100)
    restored = three_sources()
    restored.load_state(json.loads(json.dumps(mixture.state())))
    assert restored.history == mixture.history
    assert read(restored) == read(mixture)
    with pytest.raises(InputError, match="the saved data mix has seed 3, this mixture 4"):
        three_sources(seed=4).load_state(mixture.state())


@pytest.mark.parametrize("build, message", [
    (lambda: SourceMixture({"a": []}, {"a": 1.0}, batch_size=2, num_items=4), "source 'a' is empty"),
    (lambda: SourceMixture({"a": tagged(0, 3)}, {"b": 1.0}, batch_size=2, num_items=4), "missing 'a'"),
    (lambda: SourceMixture({"a": tagged(0, 3)}, {"a": 0.0}, batch_size=2, num_items=4), "weights sum to 0"),
    (lambda: SourceMixture({"a": tagged(0, 3)}, {"a": 1.0}, batch_size=0, num_items=4), "batch_size must be"),
    (lambda: three_sources().set_weights({"a": 1.0, "b": 1.0, "c": 1.0}, from_batch=-1), "from_batch must be"),
])
def test_bad_mixture_inputs_are_named(build, message):
    with pytest.raises(InputError, match=message):
        build()


# ---- the callback in a real distillation ----------------------------------------------------
# Two sources over disjoint tokens: "easy" cycles through 4 tokens, "hard" follows a random
# permutation of the other 57 (a bigram table 14 times larger). A teacher trained on both knows
# both; the student learns the easy one first, so the hard one keeps the larger excess.

HARD_NEXT = torch.randperm(VOCAB - 7, generator=torch.Generator().manual_seed(7)) + 7


def easy_rows(n: int, seed: int) -> torch.Tensor:
    phases = torch.randint(0, 4, (n, 1), generator=torch.Generator().manual_seed(seed))
    return 3 + (phases + torch.arange(SEQ)) % 4


def hard_rows(n: int, seed: int) -> torch.Tensor:
    tokens = [torch.randint(7, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]
    for _ in range(SEQ - 1):
        tokens.append(HARD_NEXT[tokens[-1] - 7])
    return torch.stack(tokens, dim=1)


def items(rows: torch.Tensor) -> list[dict]:
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in rows]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    rows = torch.cat([easy_rows(200, 1), hard_rows(200, 2)])
    return fit(tiny_model("llama", "training", vocab_size=VOCAB, seed=1), rows, 150)


HELDOUT = {"easy": items(easy_rows(8, 11)), "hard": items(hard_rows(8, 12))}


class RecordingMixture(SourceMixture):
    """A mixture that logs every item it serves: ("read", batch, item ids)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.events = []

    def __getitem__(self, index):
        item = super().__getitem__(index)
        self.events.append(("read", index // self.batch_size, tuple(item["input_ids"].tolist())))
        return item


class StepMarker(transformers.TrainerCallback):
    """Marks the end of each optimizer step in the mixture's log (after the mix callback's update)."""

    def __init__(self, mixture):
        self.mixture = mixture

    def on_step_end(self, args, state, control, **kwargs):
        self.mixture.events.append(("step", state.global_step, None))


def distill(tmp_path, teacher, *, steps, batch=4, accumulation=1, every=5, resume=None, save_steps=None,
            trainer_class=DistillationTrainer, **arg_overrides):
    mixture = RecordingMixture({"easy": items(easy_rows(64, 3)), "hard": items(hard_rows(64, 4))},
                               {"easy": 0.5, "hard": 0.5}, batch_size=batch,
                               num_items=batch * accumulation * steps, seed=0)
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path), "per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulation,
        "learning_rate": 1e-2, "max_steps": steps, "lr_scheduler_type": "constant", "logging_steps": 1,
        "report_to": [], "save_strategy": "steps" if save_steps else "no", "save_steps": save_steps or 500,
        "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0, "seed": 0, **arg_overrides})
    reference = reference_losses(teacher, HELDOUT)
    lines = []
    callbacks = [dynamic_mix_callback(mixture, HELDOUT, reference, every=every, log=lines.append),
                 StepMarker(mixture)]
    student = tiny_model("llama", "training", vocab_size=VOCAB, seed=2).train()
    extra = {"teacher_model": teacher} if trainer_class is DistillationTrainer else {}
    trainer = trainer_class(model=student, args=args, train_dataset=mixture, callbacks=callbacks, **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, mixture, lines


def test_the_weight_moves_to_the_source_the_student_lags_on(tmp_path, teacher):
    reference = reference_losses(teacher, HELDOUT)
    assert max(reference.values()) < 0.1  # the teacher knows both sources
    trainer, mixture, lines = distill(tmp_path, teacher, steps=25)
    mixes = [e for e in trainer.state.log_history if "mix/hard" in e]
    assert [e["step"] for e in mixes] == [0, 5, 10, 15, 20]
    assert mixes[0]["mix/hard"] == 0.5
    assert all(e["mix/hard"] > 0.5 for e in mixes[1:])
    assert all(e["mix_excess/hard"] > e["mix_excess/easy"] > 0 for e in mixes[1:2])
    assert mixture.weights_at(mixture.num_batches - 1)["hard"] > 0.9
    # The training batches followed: after the first update, mostly hard ones.
    late = [mixture.source_at(b) for b in range(mixture.history[1][0], mixture.num_batches)]
    assert late.count("hard") > 0.7 * len(late)
    assert any(line.startswith("[distill] step 5: data mix easy") for line in lines)


def test_new_weights_start_at_the_next_batch_the_loader_reads(tmp_path, teacher):
    trainer, mixture, _ = distill(tmp_path, teacher, steps=8, accumulation=3, every=2)
    assert [start for start, _ in mixture.history] == [0, 7, 13, 19]  # (step · 3 + 1) · 1 process
    events = mixture.events
    for start, _ in mixture.history[1:]:
        step = (start - 1) // 3
        marker = events.index(("step", step, None))
        read_before = [batch for kind, batch, _ in events[:marker] if kind == "read"]
        read_after = [batch for kind, batch, _ in events[marker:] if kind == "read"]
        # Every batch before the update's start had been read, none from it: the loader's next read is it.
        assert max(read_before) == start - 1 and read_after[0] == start


def test_a_resumed_run_restores_the_mix_and_draws_the_same_items(tmp_path, teacher):
    first, mixture, _ = distill(tmp_path, teacher, steps=12, batch=2, accumulation=2, every=3, save_steps=6)
    assert len(mixture.history) == 4  # updates at steps 3, 6 and 9
    resumed, again, lines = distill(tmp_path, teacher, steps=12, batch=2, accumulation=2, every=3, save_steps=6,
                                    resume=str(tmp_path / "checkpoint-6"))
    assert [start for start, _ in again.history] == [start for start, _ in mixture.history]
    for (_, weights), (_, expected) in zip(again.history, mixture.history):
        assert weights == pytest.approx(expected, rel=1e-9)
    reads = [(batch, ids) for kind, batch, ids in mixture.events if kind == "read"]
    reads_again = [(batch, ids) for kind, batch, ids in again.events if kind == "read"]
    assert reads_again == [read for read in reads if read[0] >= 6 * 2]
    assert any("resuming the data mix: 3 weight setting(s) restored" in line for line in lines)
    restored = [e for e in resumed.state.log_history if "mix/hard" in e]
    assert [e["step"] for e in restored] == [0, 3, 6, 9]


@pytest.mark.parametrize("overrides, message", [
    (dict(trainer_class=transformers.Trainer), "must be read in order, got a .*RandomSampler"),
    (dict(dataloader_num_workers=1), "needs --dataloader_num_workers 0"),
    (dict(per_device_train_batch_size=3), "--per_device_train_batch_size 3 differs from the data mix's batch size 4"),
    (dict(num_train_epochs=2, max_steps=-1), "the run reads 16 items"),
])
def test_a_run_that_could_not_replay_its_mix_is_refused(tmp_path, teacher, overrides, message):
    with pytest.raises(InputError, match=message):
        distill(tmp_path, teacher, steps=2, **overrides)


def test_bad_callback_inputs_are_named():
    mixture = SourceMixture({"easy": tagged(0, 3), "hard": tagged(1, 3)}, {"easy": 1, "hard": 1},
                            batch_size=2, num_items=8)
    with pytest.raises(InputError, match="heldout must name exactly the sources 'easy', 'hard': missing 'hard'"):
        dynamic_mix_callback(mixture, {"easy": HELDOUT["easy"]}, {"easy": 1.0, "hard": 1.0}, every=2)
    with pytest.raises(InputError, match="every must be a positive int"):
        dynamic_mix_callback(mixture, HELDOUT, {"easy": 1.0, "hard": 1.0}, every=0)
    with pytest.raises(InputError, match=r"the bounds must satisfy"):
        dynamic_mix_callback(mixture, HELDOUT, {"easy": 1.0, "hard": 1.0}, every=2, min_weight=0.6, max_weight=0.5)


# ---- training_set with a known length (texts, live targets) ---------------------------------


def test_a_mix_of_known_length_holds_exactly_its_share_of_synthetic_items():
    from collections import Counter

    from slimlm.distill.items import training_set

    classic = [{"id": ("corpus", index)} for index in range(1000)]
    synthetic = [{"id": ("synthetic", index)} for index in range(7)]
    mixed = training_set(classic, synthetic, 0.35, seed=3, num_items=40)
    ids = [mixed[index]["id"] for index in range(len(mixed))]
    assert len(ids) == 40 and sum(kind == "synthetic" for kind, _ in ids) == 14
    # each source repeats an item only once it has served them all
    assert set(Counter(ids[i] for i in range(40) if ids[i][0] == "synthetic").values()) == {2}
    assert len({item for item in ids if item[0] == "corpus"}) == 26
    assert [training_set(classic, synthetic, 0.35, seed=3, num_items=40)[i]["id"] for i in range(40)] == ids
    assert [training_set(classic, synthetic, 0.35, seed=4, num_items=40)[i]["id"] for i in range(40)] != ids
    # Over whole epochs (no known length) the share is of the whole corpus, and nothing repeats.
    assert len(training_set(classic, synthetic, 0.35, seed=3)) == 1007
    with pytest.raises(IndexError):
        mixed[40]
