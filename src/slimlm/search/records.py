"""What ``slimlm.search`` writes and reads back: ``search.json`` (also the resume record), the
CSV of every candidate, the winner's ``Target`` and the plot. Every file goes through
``slimlm.outputs`` (atomic), so an interrupted search leaves the last complete record.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict

from slimlm import outputs
from slimlm.errors import InputError
from slimlm.search.candidates import AXES, Candidate

RECORD_FILE = "search.json"
CSV_FILE = "search.csv"
TARGET_FILE = "winner_target.json"
PLOT_FILE = "search.png"
WINNER_DIR = "winner"
LOSSES = ("zero_shot_kd_loss", "lm_loss", "distill_loss")
COLUMNS = ("rank", "key", *AXES, "depth_selection", "params", "memory_bytes", *LOSSES)


class StaleSearch(InputError):
    """``out`` holds a search made from other inputs (the caller may clear it and start afresh)."""


def candidate_record(candidate: Candidate) -> dict:
    """A candidate's row of search.json: its shape and sizes, losses still null, no rank."""
    return {"key": candidate.key, **candidate.to_dict(), **dict.fromkeys(LOSSES), "rank": None}


def load_finished(out: str | None, inputs: dict) -> tuple[dict[str, dict], dict]:
    """Rows of a previous search in ``out`` by key, and its seconds per phase (both empty
    without one); ``StaleSearch`` (an InputError) when that search had other inputs (model,
    scores, data, budget, space or settings)."""
    path = os.path.join(out, RECORD_FILE) if out else None
    if not path or not os.path.isfile(path):
        return {}, {}
    try:
        with open(path, encoding="utf-8") as handle:
            previous = json.load(handle)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); choose another out folder or remove it to start "
                         "afresh") from None
    before = previous.get("inputs", {})
    differ = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
    if differ:
        raise StaleSearch(f"{out} holds a search with other inputs (they differ in {', '.join(differ)}); choose "
                         "another out folder or remove it to start afresh")
    return {row["key"]: row for row in previous.get("candidates", [])}, previous.get("phase_seconds") or {}


def write_record(out: str, inputs: dict, rows: list[dict], winner: dict | None, phases: dict) -> None:
    outputs.claim(out)  # a search folder written in place is slimlm's own from its first record
    outputs.write_json(os.path.join(out, RECORD_FILE),
                       {"inputs": inputs, "candidates": rows, "winner": winner, "phase_seconds": phases})


def write_results(out: str, rows: list[dict], winner: dict, target) -> None:
    """The CSV of every candidate, the winner's Target (JSON) and the plot."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row["rank"]))
    outputs.write_text(os.path.join(out, CSV_FILE), text.getvalue())
    outputs.write_json(os.path.join(out, TARGET_FILE), asdict(target))
    plot(rows, winner, os.path.join(out, PLOT_FILE))


def plot(rows: list[dict], winner: dict, path: str) -> str:
    """Parameters vs held-out KD loss: zero-shot for every candidate, after the short
    distillation for the re-ranked ones, the winner marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    ax.scatter([r["params"] for r in rows], [r["zero_shot_kd_loss"] for r in rows], s=18, label="zero-shot KD loss")
    distilled = [r for r in rows if r["distill_loss"] is not None]
    if distilled:
        ax.scatter([r["params"] for r in distilled], [r["distill_loss"] for r in distilled], s=30, marker="s",
                   label="KD loss after the short distillation")
    loss = winner["distill_loss"] if winner["distill_loss"] is not None else winner["zero_shot_kd_loss"]
    ax.scatter([winner["params"]], [loss], s=160, marker="*", color="tab:red", zorder=3, label=f"winner {winner['key']}")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out KD loss (nats/token)")
    ax.set_title("architecture search")
    ax.legend(fontsize=8)
    figure.tight_layout()
    with outputs.atomic_output(path, folder=False) as staging:
        figure.savefig(staging, dpi=110, format="png")
    return path
