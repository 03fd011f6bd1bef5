"""The offline teacher end to end: ``slimlm tokenize`` → ``slimlm teacher-cache`` → ``slimlm distill
--teacher-cache`` with no teacher loaded, and a recipe's ``teacher_cache`` section; the refusals."""
import json

import pytest
import torch

from slimlm.distill.topk_cache import load_teacher_topk
from slimlm.shards import TokenShards

from .helpers import one_line_error, run_cli, stage_lines, write_recipe


@pytest.fixture(scope="module")
def shards(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("offline") / "shards"
    from slimlm import cli

    assert cli.main(["tokenize", "--tokenizer", str(workspace / "teacher"), "--data", str(workspace / "data" / "*.txt"),
                     "--out", str(out), "--no-progress"]) == 0
    return out


def test_the_cache_matches_the_live_teacher_and_a_student_learns_from_it_alone(workspace, shards, capsys, tmp_path):
    from slimlm.distill.topk_cache import teacher_topk
    from slimlm.models import load_model

    cache_dir = tmp_path / "cache"
    code, out, err = run_cli(capsys, "teacher-cache", "--teacher", workspace / "teacher", "--data", shards,
                             "--seq-len", 16, "--k", 8, "--num-blocks", 6, "--out", cache_dir, "--no-progress")
    assert code == 0, err
    cache = load_teacher_topk(cache_dir)
    assert cache.num_sequences == 6 and cache.k == 8
    # Each cached block is a block of the shards, and its targets the live teacher's (within the codec's rounding).
    teacher = load_model(workspace / "teacher")
    item = cache.sequence(0)
    blocks = TokenShards(shards).blocks(16)
    assert any(torch.equal(item["input_ids"], blocks[i]["input_ids"]) for i in range(len(blocks)))
    live_logprobs, live_ids = teacher_topk(teacher, item["input_ids"][None], 8)
    assert torch.equal(item["topk_indices"].sort(-1).values, live_ids[0].long().sort(-1).values)
    torch.testing.assert_close(item["topk_logprobs"][:, 0], live_logprobs[0, :, 0], atol=0.05, rtol=0.05)

    # The distillation runs from the cache alone: no --teacher.
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, "prune", "--model", workspace / "teacher", "--drop-layers", "1", "--out", pruned)[0] == 0
    code, out, err = run_cli(capsys, "distill", "--student", pruned, "--teacher-cache", cache_dir, "--data", shards,
                             "--seq-len", 16, "--batch-size", 2, "--lr", "1e-3", "--max_steps", 3, "--report_to",
                             "none", "--out", tmp_path / "distilled", "--no-progress")
    assert code == 0, err
    record = json.loads((tmp_path / "distilled" / "slimlm_distill.json").read_text())
    assert record["teacher_fingerprint"] is None and record["inputs"]["teacher_cache"]
    assert record["num_train_items"] == 6 and record["precision_used"]["teacher"] is None
    assert any("topk_loss" in entry for entry in record["log_history"])

    # Refused: another block length than the cache's, a live teacher's setting, both or no teacher.
    common = ["distill", "--student", pruned, "--data", shards, "--out", tmp_path / "bad", "--no-progress"]
    code, _, err = run_cli(capsys, *common, "--teacher-cache", cache_dir, "--seq-len", 32)
    assert "holds blocks of 16 tokens; --seq-len is 32" in one_line_error(code, err, "distill")
    code, _, err = run_cli(capsys, *common, "--teacher-cache", cache_dir, "--hidden-loss-weight", 1)
    assert "--hidden-loss-weight need(s)" in one_line_error(code, err, "distill")
    code, _, err = run_cli(capsys, *common, "--teacher-cache", cache_dir, "--teacher", workspace / "teacher")
    assert "give --teacher or --teacher-cache" in one_line_error(code, err, "distill")
    code, _, err = run_cli(capsys, *common, "--teacher-cache", cache_dir, "--data", str(workspace / "data" / "*.txt"))
    assert "must be the token shards the cache was made on" in one_line_error(code, err, "distill")
    assert not (tmp_path / "bad").exists()


def test_teacher_cache_refuses_text_data_and_keeps_a_finished_cache(workspace, shards, capsys, tmp_path):
    out = tmp_path / "cache"
    code, _, err = run_cli(capsys, "teacher-cache", "--teacher", workspace / "teacher", "--data",
                           workspace / "heldout.txt", "--out", out)
    assert "not token shards; make them with slimlm tokenize" in one_line_error(code, err, "teacher-cache")
    args = ["teacher-cache", "--teacher", workspace / "teacher", "--data", shards, "--seq-len", 16, "--k", 4,
            "--num-blocks", 2, "--out", out, "--no-progress"]
    assert run_cli(capsys, *args)[0] == 0
    code, _, err = run_cli(capsys, *args)
    assert "already exists; pass --overwrite" in one_line_error(code, err, "teacher-cache")
    code, stdout, err = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and "holds the teacher's top 4 on these blocks" in stdout, err
    code, _, err = run_cli(capsys, *args[:-3], "--k", 0, "--out", tmp_path / "zero")
    assert "--k must be > 0" in one_line_error(code, err, "teacher-cache")


def test_a_recipe_with_a_teacher_cache_distills_from_it(workspace, capsys, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(workspace, "cached.yaml", out=str(out), synthetic=None, teacher_cache={"k": 8})
    code, stdout, err = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0, err
    assert "[teacher_cache] running" in stdout and (out / "teacher-cache" / "manifest.json").is_file()
    record = json.loads((out / "distilled" / "slimlm_distill.json").read_text())
    assert record["inputs"]["teacher_cache"] and record["inputs"]["teacher"] is None
    code, stdout, _ = run_cli(capsys, "run", recipe, "--no-progress")
    assert code == 0 and all("skipped" in line for line in stage_lines(stdout) if not line.startswith("[setup]"))
    # A distillation that needs the live teacher is refused before anything is written.
    bad = write_recipe(workspace, "cached-bad.yaml", out=str(tmp_path / "bad"), teacher_cache={"k": 8})
    code, _, err = run_cli(capsys, "run", bad, "--no-progress")
    assert "synthetic.mix need(s) the live teacher" in one_line_error(code, err, "run")
    assert not (tmp_path / "bad").exists()
    bad = write_recipe(workspace, "cached-bad.yaml", out=str(tmp_path / "bad"), synthetic=None,
                       teacher_cache={"k": 8}, distill__corpus_sources=True)
    code, _, err = run_cli(capsys, "run", bad, "--no-progress")
    assert "which distill.corpus_sources cannot split by source" in one_line_error(code, err, "run")
    assert not (tmp_path / "bad").exists()


def test_a_served_teacher_makes_the_same_cache(workspace, shards, capsys, tmp_path):
    """``--server``: the cache from an OpenAI-compatible server's prompt_logprobs (a fake vLLM
    server answering from the same teacher) holds the in-process cache's top-k ids."""
    import threading
    from http.server import ThreadingHTTPServer

    from slimlm.models import load_model
    from tests.distill.test_served import FakeServer, FakeVLLM

    FakeServer.engine, FakeServer.bodies, FakeServer.failures = FakeVLLM(load_model(workspace / "teacher")), [], []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        common = ["teacher-cache", "--teacher", workspace / "teacher", "--data", shards, "--seq-len", 16, "--k", 4,
                  "--num-blocks", 3, "--no-progress"]
        code, _, err = run_cli(capsys, *common, "--server", f"http://127.0.0.1:{httpd.server_address[1]}",
                               "--server-model", "tiny-teacher", "--out", tmp_path / "served")
        assert code == 0, err
        assert run_cli(capsys, *common, "--out", tmp_path / "local")[0] == 0
        code, _, err = run_cli(capsys, *common, "--server", "http://127.0.0.1:9", "--temperature", 2,
                               "--out", tmp_path / "hot")
        assert "a served teacher's log-probs are at temperature 1" in one_line_error(code, err, "teacher-cache")
    finally:
        httpd.shutdown()
        httpd.server_close()
    served, local = load_teacher_topk(tmp_path / "served"), load_teacher_topk(tmp_path / "local")
    for index in range(3):
        a, b = served.sequence(index), local.sequence(index)
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["topk_indices"].sort(-1).values, b["topk_indices"].sort(-1).values)
