"""The report of a pruning + distillation run: ``report.md``, ``report.html`` and PNG plots.

    write_report("out/report", results=[teacher, pruned, distilled],   # slimlm.evaluate.evaluate_model dicts
                 scores=importance_scores, log_history=trainer.state.log_history,
                 plan_text=str(prune_plan), notes={"command": "slimlm demo"})

Plots (matplotlib, Agg backend): ``importance.png`` (``ImportanceScores.plot``),
``loss.png`` (training loss / KD loss per step from the Trainer's ``log_history``) and
``perplexity.png`` (held-out perplexity per stage, log scale) and ``speed.png`` (decode and
prefill tokens/s per model and batch size, from a ``slimlm.speed.speed_report``, which also
makes the report's speed section) and ``search.png`` (an architecture search's candidates,
parameters vs held-out KD loss, beside its section). Every input but ``results`` is optional; a plot or section is
left out when its data is absent.
"""
from __future__ import annotations

import html
import os

from slimlm import outputs
from slimlm.evaluate import comparison_rows, format_table, held_out_splits
from slimlm.models import RENAMED_DTYPES
from slimlm.speed import speed_rows

LOSS_KEYS = ("loss", "kd_loss", "ce_loss", "hidden_loss")


def loss_label(key: str) -> str | None:
    """The legend of a held-out NLL logged along the training (``<split>_nll``); None for a loss."""
    if not key.endswith("_nll"):
        return None
    split = key[: -len("_nll")]
    return "held-out NLL (in-domain)" if split == "heldout" else f"held-out NLL ({split})"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("the report's plots need matplotlib (pip install 'slimlm[plot]')") from None
    return plt


def loss_curves(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{loss name: (steps, values)} from a Trainer ``log_history`` (training logs only)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key in entry:
            if key in LOSS_KEYS or loss_label(key) is not None:
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(entry["step"]))
                values.append(float(entry[key]))
    return curves


def plot_loss(log_history: list[dict], path: str) -> str | None:
    """Draw the loss curves into ``path``; None (nothing written) when the history has no loss."""
    curves = loss_curves(log_history)
    if not curves:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4))
    for key, (steps, values) in curves.items():
        held_out = loss_label(key) is not None
        ax.plot(steps, values, marker="s" if held_out else ("o" if len(steps) < 30 else None),
                markersize=5 if held_out else 3, linestyle="--" if held_out else "-", label=loss_label(key) or key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("distillation loss" + (", held-out NLL along it" if any(loss_label(k) for k in curves) else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def mix_curves(log_history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{source: (steps, sampling weight)} of a dynamic mix (``mix/<source>`` in the log history)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("mix/") and "step" in entry:
                steps, values = curves.setdefault(key[len("mix/"):], ([], []))
                steps.append(int(entry["step"]))
                values.append(float(value))
    return curves


def plot_mix(log_history: list[dict], path: str) -> str | None:
    """The dynamic mix's sampling weight of each source against the step into ``path``; None
    (nothing written) when the history has none."""
    curves = mix_curves(log_history)
    if not curves:
        return None
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(7, 4))
    for source, (steps, values) in curves.items():
        ax.step(steps, values, where="post", marker="o", markersize=3, label=source)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("sampling weight")
    ax.set_ylim(0, 1)
    ax.set_title("dynamic data mix: each source's weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_perplexity(results: list[dict], path: str) -> str:
    """Bar chart of held-out perplexity per model/stage (log scale), values printed on the bars;
    beside it each other held-out set's that every result has (``held_out_splits``)."""
    plt = _pyplot()
    names = [result["name"] for result in results]
    sets = [("held-out", "perplexity")]
    if held_out_splits(results):
        sets = [("in-domain held-out", "perplexity")] + [(f"{split} held-out", f"{split}_perplexity")
                                                          for split in held_out_splits(results)]
    width = 0.8 / len(sets)
    figure, ax = plt.subplots(figsize=(1.6 * len(names) * len(sets) + 3, 4))
    for number, (label, field) in enumerate(sets):
        values = [result[field] for result in results]
        offsets = [i + (number - (len(sets) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(offsets, values, width=width, label=label)
        for bar, value in zip(bars, values):
            ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title("perplexity per stage (lower is better)")
    if len(sets) > 1:
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_speed(speed: dict, path: str) -> str:
    """Grouped bars of decode and prefill tokens/s per batch size, one colour per model."""
    plt = _pyplot()
    names = list(speed["models"])
    batches = list(next(iter(speed["models"].values()))["batch"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(names)
    for ax, field, label in ((axes[0], "decode_tokens_per_s", "decode"), (axes[1], "prefill_tokens_per_s", "prefill")):
        for number, name in enumerate(names):
            values = [speed["models"][name]["batch"][batch][field] for batch in batches]
            positions = [index + number * width for index in range(len(batches))]
            ax.bar(positions, values, width, label=name)
        ax.set_xticks([index + width * (len(names) - 1) / 2 for index in range(len(batches))],
                      [f"batch {batch}" for batch in batches])
        ax.set_ylabel("tokens/s (higher is better)")
        ax.set_title(f"{label} throughput")
        ax.grid(alpha=0.3, axis="y")
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def speed_note(speed: dict) -> str:
    """One sentence saying how the speed figures were measured."""
    setup = speed["setup"]
    return (f"Greedy decoding of a fixed {setup['prompt_tokens']}-token prompt for {setup['new_tokens']} tokens with "
            f"the KV cache on {setup['device']}, medians of {setup['rounds']} rounds alternating between the models "
            f"(after {setup['warmup']} warm-up). TTFT: prefill + first token; TPOT: time per later token; memory: "
            f"{setup['memory']}. × columns: ratio to {next(iter(speed['models']))} (above 1 is better for tokens/s, "
            "below 1 for memory and size).")


def _markdown_table(rows: list[list[str]], numeric: bool = True) -> str:
    """A markdown table; ``numeric`` right-aligns every column but the first."""
    def line(cells):
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = ["---"] + ["---:" if numeric else "---"] * (len(rows[0]) - 1)
    return "\n".join([line(rows[0]), "| " + " | ".join(align) + " |"] + [line(row) for row in rows[1:]])


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def sample_rows(results: list[dict]) -> list[list[str]]:
    """Header + one row per prompt with each model's greedy continuation, side by side."""
    with_samples = [result for result in results if result.get("samples")]
    if not with_samples:
        return []
    prompts = list(with_samples[0]["samples"])
    rows = [["prompt"] + [result["name"] for result in with_samples]]
    for prompt in prompts:
        rows.append([prompt] + [" ".join(result["samples"].get(prompt, "").split()) for result in with_samples])
    return rows


def write_report(folder: str | os.PathLike, *, results: list[dict], scores=None, log_history=None,
                 plan_text: str | None = None, notes: dict | None = None, title: str = "slimlm report",
                 speed: dict | None = None, search: dict | None = None,
                 sections: dict[str, list[str]] | None = None) -> dict:
    """Write ``report.md``, ``report.html`` and the plots into ``folder``, which is replaced
as a whole, atomically (``slimlm.outputs``).

    ``results``: ``slimlm.evaluate.evaluate_model`` dicts, the first being the reference
    (the teacher). ``scores``: ``ImportanceScores``. ``notes``: extra key → value lines
    (command, data, budget). ``speed``: a ``slimlm.speed.speed_report`` (teacher first) for the
    speed section and plot. ``search``: a search's ``search.json`` record (candidates, winner,
    phase_seconds; optional ``rerank_tokens``: the winner's, counted in the distillation) for
    the architecture-search section and plot. ``sections``: more {title: markdown lines} (a
    gradual schedule's steps, teacher-written text), after the models' table. Returns
    {"markdown", "html", "plots": {name: path}}.
    """
    if not results:
        raise ValueError("write_report needs at least one evaluated model in results")
    final = os.path.abspath(os.fspath(folder))
    with outputs.atomic_output(final) as staging:
        report = _write_report(staging, results=results, scores=scores, log_history=log_history,
                               plan_text=plan_text, notes=notes, title=title, speed=speed, search=search,
                               sections=sections)

    def moved(path):
        return os.path.join(final, os.path.basename(path))

    return {**report, "markdown": moved(report["markdown"]), "html": moved(report["html"]),
            "plots": {name: moved(path) for name, path in report["plots"].items()}}


def search_rows(search: dict) -> list[list[str]]:
    """The search section's table: every scored candidate by rank (losses in nats/token)."""
    def loss(value):
        return "-" if value is None else f"{value:.4f}"

    rows = [["rank", "candidate", "hidden", "MLP", "heads", "KV heads", "layers", "params", "zero-shot KD",
             "LM", "KD after short distillation"]]
    for row in sorted(search["candidates"], key=lambda row: row["rank"]):
        rows.append([str(row["rank"]), row["key"], str(row["hidden_size"]), str(row["intermediate_size"]),
                     str(row["num_attention_heads"]), str(row["num_key_value_heads"]), str(row["num_layers"]),
                     f"{row['params']:,}", loss(row["zero_shot_kd_loss"]), loss(row["lm_loss"]),
                     loss(row["distill_loss"])])
    return rows


def search_note(search: dict) -> str:
    """One sentence on how the search ranked, and what it cost."""
    candidates = search["candidates"]
    reranked = sum(row["distill_loss"] is not None for row in candidates)
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in (search.get("phase_seconds") or {}).items())
    text = (f"{len(candidates)} candidates closest to the budget scored zero-shot on held-out calibration blocks "
            f"(KD loss against the teacher, LM loss); the best {reranked} re-ranked by the same short "
            f"distillation. Winner: {search['winner']['key']}. Phases: {phases}.")
    if search.get("rerank_tokens"):
        text += (f" The distillation continued from the winner's short-distilled student: its "
                 f"{search['rerank_tokens']:,} tokens count in the distillation budget.")
    return text


def _write_report(folder: str, *, results, scores, log_history, plan_text, notes, title, speed,
                  search=None, sections=None) -> dict:
    plots = {"perplexity": plot_perplexity(results, os.path.join(folder, "perplexity.png"))}
    if log_history:
        loss = plot_loss(log_history, os.path.join(folder, "loss.png"))
        if loss:
            plots["loss"] = loss
        mix = plot_mix(log_history, os.path.join(folder, "mix.png"))
        if mix:
            plots["mix"] = mix
    if scores is not None:
        plots["importance"] = scores.plot(os.path.join(folder, "importance.png"))
    if speed is not None:
        plots["speed"] = plot_speed(speed, os.path.join(folder, "speed.png"))
    if search is not None:
        from slimlm.search.records import plot as plot_search

        plots["search"] = plot_search(search["candidates"], search["winner"], os.path.join(folder, "search.png"))

    table = comparison_rows(results)
    samples = sample_rows(results)
    captions = {"perplexity": "Held-out perplexity per stage", "loss": "Distillation loss",
                "importance": "Importance scores of the teacher", "speed": "Inference throughput, teacher vs student",
                "search": "Architecture search: parameters vs held-out KD loss",
                "mix": "Dynamic data mix: sampling weight per source"}
    speed_table = speed_rows(speed) if speed is not None else None
    search_table = search_rows(search) if search is not None else None

    md = [f"# {title}", ""]
    for key, value in (notes or {}).items():
        md.append(f"- **{key}**: {value}")
    md += ["", "## Models", "", _markdown_table(table), ""]
    md.append("Perplexity: exp of the mean next-token NLL over the held-out blocks (padding masked)"
              + (f"; {', '.join(held_out_splits(results))}: the same on held-out sets of other registers than "
                 "the training text" if held_out_splits(results) else "")
              + ". tokens/s: forward (prefill) throughput of that pass on this machine.")
    for heading, lines in (sections or {}).items():
        md += ["", f"## {heading}", "", *lines]
    if speed_table:
        md += ["", "## Inference speed", "", _markdown_table(speed_table), "", speed_note(speed)]
    if search_table:
        md += ["", "## Architecture search", "", _markdown_table(search_table), "", search_note(search)]
    if plan_text:
        md += ["", "## Pruning plan", "", "```", plan_text, "```"]
    if samples:
        md += ["", "## Greedy samples", "", _markdown_table(samples, numeric=False)]
    md += ["", "## Plots", ""]
    for key, path in plots.items():
        md += [f"### {captions[key]}", "", f"![{captions[key]}]({os.path.basename(path)})", ""]
    markdown_path = os.path.join(folder, "report.md")
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(md) + "\n")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
             "vertical-align:top}td{text-align:right}td:first-child{text-align:left}"
             "pre{background:#f4f4f4;padding:1em}img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><ul>"]
    parts += [f"<li><b>{html.escape(str(key))}</b>: {html.escape(str(value))}</li>" for key, value in (notes or {}).items()]
    parts += ["</ul><h2>Models</h2>", _html_table(table)]
    for heading, lines in (sections or {}).items():
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<pre>{html.escape(chr(10).join(lines))}</pre>"]
    if speed_table:
        parts += ["<h2>Inference speed</h2>", _html_table(speed_table), f"<p>{html.escape(speed_note(speed))}</p>"]
    if search_table:
        parts += ["<h2>Architecture search</h2>", _html_table(search_table), f"<p>{html.escape(search_note(search))}</p>"]
    if plan_text:
        parts += ["<h2>Pruning plan</h2>", f"<pre>{html.escape(plan_text)}</pre>"]
    if samples:
        parts += ["<h2>Greedy samples</h2>", _html_table(samples).replace("<td>", "<td style='text-align:left'>")]
    parts.append("<h2>Plots</h2>")
    for key, path in plots.items():
        parts.append(f"<h3>{captions[key]}</h3><img src='{html.escape(os.path.basename(path))}' "
                     f"alt='{captions[key]}'>")
    parts.append("</body></html>")
    html_path = os.path.join(folder, "report.html")
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts) + "\n")
    return {"markdown": markdown_path, "html": html_path, "plots": plots, "table": format_table(table)}


# ------------------------------------------------------------- a run's notes
def run_notes(recipe: dict, *, command: str, documents: dict[str, int], distill_record: dict, sizes: str,
              device: str, timings: dict[str, float], tokens: dict[str, int] | None = None) -> dict[str, str]:
    """The key → line notes of a recipe's report: the command, the teacher and target, the data
    (``documents`` and ``tokens``: counts per split), how the distillation went (``distill_record``: the
    distilled student's ``slimlm_distill.json``), the sizes on disk, the device and the seconds
    per stage."""
    section = recipe["distill"]
    record = distill_record
    tokens = tokens or {}

    def count(name: str) -> str:
        return f"{documents[name]} " + (f"({tokens[name]:,} tokens) " if tokens.get(name) is not None else "")

    data = (f"{count('train')}training documents, {count('heldout')}held-out documents (never used for "
            "calibration or training)")
    for split in (name for name in documents if name not in ("train", "heldout")):
        data += (f", {count(split)}{split} held-out documents (another register: neither the training "
                 "text nor its domain)")
    speed = f" ({record['tokens_seen'] / record['train_seconds']:.0f} tokens/s)" if record.get("train_seconds") else ""
    fitted = (f", schedule fitted to the time: {record['scheduled_steps']} steps"
              if section["fit_to_time"] and record.get("scheduled_steps") else "")
    parts = [f"{record['steps']} steps, {record['tokens_seen']:,} tokens (budget {section['max_tokens'] or '-'} "
             f"tokens / {minutes_note(section, record)} min{fitted}), {record['train_seconds'] or 0:.0f} s{speed}",
             f"lr {section['lr']}", f"seq_len {section['seq_len']}", f"temperature {section['temperature']}",
             f"beta {section['beta']}", precision_note(section, record)]
    if section["hidden_loss_weight"]:
        parts.append(f"hidden-state loss {section['hidden_loss_weight']} ({section['hidden_loss_schedule']})")
    if section["on_policy_fraction"]:
        parts.append(f"on-policy fraction {section['on_policy_fraction']}")
    distillation = ", ".join(parts)
    if section["freeze_embeddings"]:
        distillation += ", embeddings and LM head frozen"
    if recipe["correct_teacher"]:
        distillation += f", from the teacher corrected on {recipe['correct_teacher']['tokens']:,} tokens"
    mix = mix_note(record)
    return {"command": command, "teacher": recipe["teacher"], "target": recipe["target"], "data": data,
            "distillation": distillation, **({"data mix": mix} if mix else {}), "sizes on disk": sizes,
            "device": device,
            "stage seconds": ", ".join(f"{name} {seconds:.0f}" for name, seconds in timings.items())}


def mix_note(distill_record: dict) -> str | None:
    """The sampling weight of each source of a mixed training set (the record's ``data_mix``): the
    static weights, or a dynamic mix's first and last; None without a mix."""
    history = distill_record.get("data_mix")
    if not history:
        return None

    def weights(entry):
        return ", ".join(f"{name} {weight:.3f}" for name, weight in entry["weights"].items())

    if len(history) == 1:
        return f"static: {weights(history[0])}"
    return (f"dynamic, {len(history) - 1} update(s): from {weights(history[0])} to {weights(history[-1])} "
            f"(from batch {history[-1]['from_batch']})")


def minutes_note(section: dict, distill_record: dict) -> str:
    """The distillation's time cap as the report states it: the recipe's max_minutes, and what
    finish_by_minutes shortened it to in the run that made the student."""
    used = distill_record.get("max_minutes")
    if section["finish_by_minutes"] is None or used is None:
        return f"{section['max_minutes'] or '-'}"
    if section["max_minutes"] is not None and used >= section["max_minutes"]:
        return f"{section['max_minutes']:g}"
    return f"{used:.1f} (finish_by_minutes {section['finish_by_minutes']:g})"


def precision_note(section: dict, distill_record: dict) -> str:
    """'teacher precision auto (bfloat16), student precision auto (bfloat16)': as asked, and what
    it resolved to on the machine that trained (older records lack the latter, or spell it "bf16",
    said here by its name now)."""
    used = {who: RENAMED_DTYPES.get(name, name) for who, name in (distill_record.get("precision_used") or {}).items()}
    return ", ".join(f"{who} precision {section[who + '_precision']}" + (f" ({used[who]})" if used.get(who) else "")
                     for who in ("teacher", "student"))


def sizes_note(teacher: str, saved_dtype: str, save_dtype: str) -> str:
    """How the report's sizes on disk are stored: the teacher's format, the students' dtype."""
    quantized = "a .gguf teacher is stored 4-bit quantized (Q4_1); " if str(teacher).endswith(".gguf") else ""
    return f"{quantized}students as saved: {saved_dtype} safetensors (save_dtype {save_dtype})"
