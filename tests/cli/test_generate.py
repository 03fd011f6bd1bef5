"""``slimlm generate``: synthetic text from the teacher, replaced only once complete, continued
after an interruption."""
import json
import os

from .helpers import one_line_error, run_cli


def test_generate_from_data(workspace, capsys):
    out = workspace / "synthetic.jsonl"
    code, stdout, err = run_cli(capsys, "generate", "--no-filters", "--teacher", workspace / "teacher", "--from-data",
                                workspace / "heldout.txt", "--num-prompts", 3, "--max-new-tokens", 4, "--out", out,
                                "--no-progress")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(records) <= 3 and all(r["text"].startswith(r["prompt"]) for r in records)
    code, _, err = run_cli(capsys, "generate", "--no-filters", "--teacher", workspace / "teacher", "--from-data",
                           workspace / "heldout.txt", "--out", out)
    assert code == 2 and "--overwrite" in err


def test_generate_overwrite_checks_every_input_before_replacing_the_output(workspace, capsys, tmp_path):
    out = tmp_path / "synthetic.jsonl"
    args = ["generate", "--no-filters", "--teacher", workspace / "teacher", "--max-new-tokens", 3, "--num-prompts", 2, "--out", out,
            "--no-progress"]
    assert run_cli(capsys, *args, "--from-data", workspace / "heldout.txt")[0] == 0
    finished, marker = out.read_bytes(), (tmp_path / "synthetic.jsonl.done.json").read_bytes()
    broken = tmp_path / "prompts.jsonl"
    broken.write_text('{"prompt": "the model"}\n{"no prompt": 1}\n{"prompt": "a layer"}\n')
    code, _, err = run_cli(capsys, *args, "--prompts", broken, "--overwrite")
    assert "record 2 has no string field 'prompt'" in one_line_error(code, err, "generate")
    assert out.read_bytes() == finished and (tmp_path / "synthetic.jsonl.done.json").read_bytes() == marker
    broken.write_text('{"prompt": "the model is small ."}\n')
    assert run_cli(capsys, *args, "--prompts", broken, "--overwrite")[0] == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["the model is small ."]
    assert sorted(os.listdir(tmp_path)) == [".synthetic.jsonl.slimlm-output.json", "prompts.jsonl", "synthetic.jsonl",
                                            "synthetic.jsonl.done.json", "synthetic.jsonl.topk"]


def test_an_interrupted_generate_is_continued_and_a_stale_partial_discarded(workspace, capsys, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "synthetic.jsonl"
    args = ["generate", "--no-filters", "--teacher", workspace / "teacher", "--from-data", workspace / "heldout.txt",
            "--max-new-tokens", 3, "--num-prompts", 3, "--out", out, "--no-progress"]
    from slimlm.distill import generate

    real_generate = generate.generate_synthetic

    def killed_before_the_swap(*a, **k):
        real_generate(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "generate_synthetic", killed_before_the_swap)
    assert run_cli(capsys, *args)[0] == 130
    assert not out.exists() and (tmp_path / ".synthetic.jsonl.slimlm-new").is_file()
    monkeypatch.setattr(generate, "generate_synthetic", real_generate)
    code, stdout, err = run_cli(capsys, *args)
    assert code == 0 and "continuing the partial" in stdout, err
    out.unlink()
    (tmp_path / "synthetic.jsonl.done.json").unlink()
    monkeypatch.setattr(generate, "generate_synthetic", killed_before_the_swap)
    assert run_cli(capsys, *args)[0] == 130
    monkeypatch.setattr(generate, "generate_synthetic", real_generate)
    code, stdout, err = run_cli(capsys, *args, "--temperature", "0.5")
    assert code == 0 and "discarding" in stdout, err
    assert {json.loads(line)["sampling"]["temperature"] for line in out.read_text().splitlines()} == {0.5}
    assert sorted(os.listdir(tmp_path)) == [".synthetic.jsonl.slimlm-output.json", "synthetic.jsonl",
                                            "synthetic.jsonl.done.json", "synthetic.jsonl.topk"]
