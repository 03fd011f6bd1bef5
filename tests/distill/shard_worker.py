"""Distillations from token shards (``distill_stage``) that record what they read: run under
``torchrun --nproc_per_node=2`` (gloo on CPU), or imported (``record``, ``distill_run``) by a
test in one process. Per run, rank r writes ``<out>/<run>-rank<r>.json``: the indices its data
loader read, in order (``items`` of the training set, ``blocks`` of the shards; the same for a
set without synthetic text), and the loss of each of its training steps. A run with KILL > 0 is
killed right after its checkpoint at step KILL and resumed: the resumed part under ``resumed``.

    shard_worker.py SHARDS OUT RUN:SEQ_LEN:EPOCHS:MIX:KILL [RUN:SEQ_LEN:EPOCHS:MIX:KILL ...]
"""
import json
import os
import sys

import torch
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimlm.distill.options import DistillOptions  # noqa: E402
from slimlm.distill.trainer import DistillationTrainer  # noqa: E402
from slimlm.distill.items import MixedItems  # noqa: E402
from slimlm.pipeline.distill import distill_stage  # noqa: E402
from slimlm.shards import ShardBlocks, TokenShards  # noqa: E402
from tiny import exit_distributed, tiny_model, word_tokenizer  # noqa: E402

BATCH = 2
SAVE_STEPS = 4
SYNTHETIC = ["the student is fast and good .", "a teacher will run the data .", "we prune the large model ."] * 6


class Killed(Exception):
    pass


class KillAfterSave(TrainerCallback):
    """Ends the run like a kill, right after the checkpoint of step ``step`` is written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(self.step)


def record(log: dict, patch=setattr) -> None:
    """Every read of a training item and of a block and every training step's loss appended to
    ``log``'s lists "items", "blocks" and "losses"; ``log["kill"]`` (a step, or 0) made a
    ``KillAfterSave`` of each DistillationTrainer. ``patch``: how a class attribute is replaced
    (pytest's ``monkeypatch.setattr`` in a test process)."""
    def recorded(cls, key):
        read = cls.__getitem__

        def getitem(self, index):
            log[key].append(int(index))
            return read(self, index)

        patch(cls, "__getitem__", getitem)

    recorded(MixedItems, "items")
    recorded(ShardBlocks, "blocks")
    step, init = DistillationTrainer.training_step, DistillationTrainer.__init__

    def training_step(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        log["losses"].append(loss.item())
        return loss

    def __init__(self, *args, callbacks=None, **kwargs):
        kill = [KillAfterSave(log["kill"])] if log["kill"] else []
        init(self, *args, callbacks=[*(callbacks or []), *kill], **kwargs)

    patch(DistillationTrainer, "training_step", training_step)
    patch(DistillationTrainer, "__init__", __init__)


def distill_run(shards, out: str, log: dict, *, seq_len: int, epochs: int, mix: float = 0.0, kill: int = 0) -> dict:
    """Distill a tiny student from shards into ``out`` for ``epochs`` epochs of blocks of
    ``seq_len`` (with ``mix`` synthetic text), a checkpoint every ``SAVE_STEPS`` steps; with
    ``kill``, killed after the checkpoint of that step and resumed. ``log``: ``record``'s. Returns
    {"run": what the (killed) run read and its losses, "resumed": the same of the resumed run or
    None}."""
    tokenizer = word_tokenizer()
    teacher = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=0)
    options = DistillOptions(seq_len=seq_len, batch_size=BATCH, lr=1e-3, teacher_precision="float32",
                             student_precision="float32")
    parts = {"run": None, "resumed": None}
    for part in ("run", "resumed") if kill else ("run",):
        log.update(items=[], blocks=[], losses=[], kill=kill if part == "run" else 0)
        student = tiny_model("llama", "training", vocab_size=len(tokenizer), seed=2, intermediate_size=32)
        try:
            distill_stage(teacher, student, tokenizer, shards, out, options,
                          synthetic_texts=SYNTHETIC if mix else None, mix_fraction=mix,
                          training_args=["--num_train_epochs", str(epochs), "--save_steps", str(SAVE_STEPS)],
                          disable_tqdm=True, log=lambda *_: None)
        except Killed:
            pass
        parts[part] = {"items": log["items"] if mix else log["blocks"], "blocks": log["blocks"],
                       "losses": log["losses"]}
    return parts


def main(shards_path: str, out: str, runs: list[str]):
    torch.set_num_threads(1)
    shards = TokenShards(shards_path)
    log = {}
    record(log)
    rank = int(os.environ.get("RANK", "0"))
    for run in runs:
        name, seq_len, epochs, mix, kill = run.split(":")
        parts = distill_run(shards, os.path.join(out, name), log, seq_len=int(seq_len), epochs=int(epochs),
                            mix=float(mix), kill=int(kill))
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(os.path.join(out, f"{name}-rank{rank}.json"), "w") as handle:
            json.dump({**parts["run"], "resumed": parts["resumed"], "world_size": world_size}, handle)
    exit_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
