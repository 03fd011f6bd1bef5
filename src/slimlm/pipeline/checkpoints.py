"""The distill stage's checkpoint folder: it belongs to one run (``RUN_RECORD`` holds that
run's inputs), is resumed only by that run from its newest complete checkpoint, and is
cleared only when slimlm wrote it."""
from __future__ import annotations

import os
import re

from slimlm.errors import InputError
from slimlm.pipeline.records import RUN_RECORD, WEIGHT_FILES, changed_inputs, read_json


def _checkpoint_steps(folder: str) -> list[tuple[int, str]]:
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        match = re.fullmatch(r"checkpoint-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            found.append((int(match.group(1)), os.path.join(folder, name)))
    return sorted(found)


def checkpoint_complete(path: str, step: int) -> bool:
    """A checkpoint the Trainer finished writing: its trainer state (written last) reads back
    with this step, and the weights are there."""
    state = read_json(os.path.join(path, "trainer_state.json"))
    return state is not None and state.get("global_step") == step and any(
        os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES)


def _own_checkpoints(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, RUN_RECORD)) or all(
        name.startswith(("checkpoint-", "runs", ".")) for name in os.listdir(folder))


def plan_checkpoints(folder: str, inputs: dict, *, resume: bool, clear_stale: bool) -> dict:
    """What to do with the checkpoint folder of a run of ``inputs`` (decided before anything
    changes): {"clear": bool, "resume": path or None, "incomplete": [paths to delete]}.
    A folder of another run is refused (InputError) unless ``clear_stale``; ``resume=False``
    starts over. Only a folder slimlm wrote is ever cleared."""
    decision = {"clear": False, "resume": None, "incomplete": []}
    if not os.path.isdir(folder) or not os.listdir(folder):
        return decision
    record = read_json(os.path.join(folder, RUN_RECORD))
    same_run = record is not None and record.get("inputs") == inputs
    if not resume or not same_run:
        if resume and not clear_stale:
            why = f"{', '.join(changed_inputs(record, inputs))} changed" if record is not None else \
                f"no {RUN_RECORD} says which"
            raise InputError(f"checkpoints {folder} belong to another run ({why}); pass --overwrite to delete them "
                             "and start over")
        if not _own_checkpoints(folder):
            raise InputError(f"checkpoints folder {folder} holds files slimlm did not write; remove it yourself")
        decision["clear"] = True
        return decision
    for step, path in reversed(_checkpoint_steps(folder)):
        if checkpoint_complete(path, step):
            decision["resume"] = path
            break
        decision["incomplete"].append(path)
    return decision
