"""slimlm.report: report.md/report.html with the table, samples and the PNG plots."""
import pytest
import torch

from slimlm.importance import ImportanceScores
from slimlm.report import loss_curves, sample_rows, write_report


def result(name, params, ppl, samples=None):
    return {"name": name, "params": params, "perplexity": ppl, "tokens_per_s": 1234.0, "disk_bytes": 4 * params,
            "format": "safetensors float32", "samples": samples or {}}


RESULTS = [result("teacher", 1000, 12.5, {"The cat": " sat on the mat"}),
           result("pruned", 500, 480.25, {"The cat": " the the the"}),
           result("distilled", 500, 30.75, {"The cat": " sat | down"})]
HISTORY = [{"loss": 3.0, "kd_loss": 3.0, "step": 1}, {"loss": 2.0, "kd_loss": 2.0, "step": 2},
           {"train_runtime": 5.0, "step": 2}]


def test_loss_curves_keep_training_logs_only():
    curves = loss_curves(HISTORY)
    assert curves == {"loss": ([1, 2], [3.0, 2.0]), "kd_loss": ([1, 2], [3.0, 2.0])}


def test_report_files_and_content(tmp_path):
    scores = ImportanceScores(scores={"activation.head": torch.rand(2, 4), "block_influence.layer": torch.rand(2)},
                              meta={"model_name": "tiny"})
    report = write_report(tmp_path / "report", results=RESULTS, scores=scores, log_history=HISTORY,
                          plan_text="PrunePlan (llama)", notes={"command": "slimlm demo"}, title="T")
    for name in ("report.md", "report.html", "perplexity.png", "loss.png", "importance.png"):
        path = tmp_path / "report" / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (tmp_path / "report" / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| distilled | 0.0M | 50.0% |" in markdown
    assert "480.25" in markdown and "30.75" in markdown and "PrunePlan (llama)" in markdown
    # A '|' inside a sample must not break the markdown table.
    assert "sat \\| down" in markdown
    # Numbers are right-aligned, sample text is not.
    assert "| --- | ---: | ---: |" in markdown and "| --- | --- | --- | --- |" in markdown
    assert "![Distillation loss](loss.png)" in markdown
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img src='importance.png'" in html and "<td>teacher</td>" in html
    assert report["table"].splitlines()[0].split() [:2] == ["model", "params"]


def test_optional_parts_are_left_out(tmp_path):
    write_report(tmp_path, results=[result("only", 10, 5.0)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["perplexity.png", "report.html", "report.md", "slimlm-output.json"]
    assert "Greedy samples" not in (tmp_path / "report.md").read_text()
    assert sample_rows([result("only", 10, 5.0)]) == []
    with pytest.raises(ValueError, match="at least one"):
        write_report(tmp_path, results=[])


def test_a_speed_report_adds_its_section_and_plot(tmp_path):
    import json

    from slimlm.speed import speed_report
    from tiny import tiny_model

    teacher, student = tiny_model("llama", num_hidden_layers=2), tiny_model("llama", num_hidden_layers=1)
    # As the pipeline stores it (speed.json): read back from JSON, batch sizes as strings.
    speed = json.loads(json.dumps(speed_report({"teacher": teacher, "student": student}, prompt_tokens=4,
                                               new_tokens=2, batch_sizes=(1, 2), rounds=1, warmup=0)))
    write_report(tmp_path, results=RESULTS, speed=speed)
    assert (tmp_path / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    section = markdown.split("## Inference speed")[1].split("##")[0]
    assert "| teacher | 1 |" in section and "| student | 2 |" in section and "decode tok/s" in section
    assert "ratio to teacher" in section and "![Inference throughput, teacher vs student](speed.png)" in markdown
    assert "<h2>Inference speed</h2>" in (tmp_path / "report.html").read_text()


def test_the_precisions_are_said_in_the_dtype_tables_names():
    """As asked and as resolved; a record written before the names changed ("bf16") is said by
    the name it has now."""
    from slimlm.report import precision_note

    section = {"teacher_precision": "auto", "student_precision": "bfloat16"}
    assert precision_note(section, {"precision_used": {"teacher": "bfloat16", "student": "float32"}}) == \
        "teacher precision auto (bfloat16), student precision bfloat16 (float32)"
    assert precision_note(section, {"precision_used": {"teacher": "float32", "student": "bf16"}}) == \
        "teacher precision auto (float32), student precision bfloat16 (bfloat16)"
    assert precision_note(section, {}) == "teacher precision auto, student precision bfloat16"
