"""Generation through vLLM (``engine: vllm``): the records and top-k caches it writes, checked
against a stand-in ``vllm`` module that answers as vLLM does (token ids, per-request seeds,
prompt and sample log-probs as ranked entries) from a tiny model in process. The real engine is
checked by ``scripts/vllm_generate_check.py`` where vLLM is installed."""
import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from slimlm.distill.generate import generate_synthetic
from slimlm.distill.options import GenerationOptions
from slimlm.distill.topk_cache import load_teacher_topk
from slimlm.distill.vllm_sampler import VLLMSampler, model_folder, sample_of, stream_seed
from slimlm.errors import InputError
from http_stub import JSONHandler
from tiny import assert_cached_targets_are_live, tiny_model, word_tokenizer

PROMPTS = ["the teacher is", "a small model", "we prune the layer", "they distill data", "the layer is"]


class Logprob:
    def __init__(self, logprob, rank):
        self.logprob, self.rank = logprob, rank


def _entries(logprobs: torch.Tensor, k: int, actual: int) -> dict:
    """vLLM's entries of one position: the top k by rank, and the actual token with its rank."""
    values, ids = logprobs.topk(k)
    entries = {int(token): Logprob(float(value), rank + 1) for rank, (value, token) in enumerate(zip(values, ids))}
    if actual not in entries:
        entries = {actual: Logprob(float(logprobs[actual]), int((logprobs > logprobs[actual]).sum()) + 1), **entries}
    return entries


class FakeLLM:
    """Samples as vLLM does for the arguments slimlm passes: one request per prompt, its own seed,
    temperature and top-p on the raw logits, stops at ``stop_token_ids`` only (``ignore_eos``)."""

    started: list = []

    def __init__(self, model, **kwargs):
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.kwargs = kwargs
        FakeLLM.started.append(kwargs)

    def generate(self, prompts, params, use_tqdm=False):
        assert isinstance(params, list) and len(params) == len(prompts)
        return [self._one(prompt["prompt_token_ids"], p) for prompt, p in zip(prompts, params)]

    def _one(self, ids, p):
        assert p.ignore_eos and p.detokenize is False
        generator = torch.Generator().manual_seed(p.seed)
        generated, steps, finish = [], [], "length"
        with torch.no_grad():
            for _ in range(p.max_tokens):
                logits = self.model(torch.tensor([ids + generated])).logits[0, -1].float()
                probs = torch.softmax(logits / p.temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                if p.logprobs:
                    steps.append(_entries(torch.log_softmax(logits, -1), p.logprobs, token))
                generated.append(token)
                if token in (p.stop_token_ids or []):
                    finish = "stop"
                    break
            prompt_logprobs = None
            if p.prompt_logprobs:
                full = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
                prompt_logprobs = [None] + [_entries(full[t - 1], p.prompt_logprobs, ids[t]) for t in range(1, len(ids))]
        answer = types.SimpleNamespace(token_ids=generated, logprobs=steps or None, finish_reason=finish)
        return types.SimpleNamespace(prompt_logprobs=prompt_logprobs, outputs=[answer])


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams, module.__version__ = FakeLLM, SamplingParams, "0.0-test"
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.started = []
    return module


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher")
    tokenizer = word_tokenizer()
    tiny_model("llama", "training", vocab_size=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _teacher(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_kept_topk_equals_a_live_teacher_forward(fake_vllm, teacher_dir, tmp_path):
    teacher = _teacher(teacher_dir)
    prompts = [("data", p) for p in PROMPTS[:4]] + [("general", PROMPTS[4])]
    data = generate_synthetic(teacher, word_tokenizer(), prompts, out_path=tmp_path / "s.jsonl", max_new_tokens=6,
                              min_new_tokens=0, progress=False, filters=False, dedupe=False, engine="vllm",
                              keep_topk=4, cache_dir=tmp_path / "cache", dtype=torch.float32,
                              engine_args='{"enforce_eager": true}')
    assert FakeLLM.started[0]["dtype"] == "float32" and FakeLLM.started[0]["max_logprobs"] == 4
    assert FakeLLM.started[0]["enforce_eager"] is True and FakeLLM.started[0]["skip_tokenizer_init"] is True
    assert data.counts["kept"] + data.counts["empty"] == len(prompts) and len(data) >= 3
    assert set(data.caches) == {record["source"] for record in data.records}
    # the row after the last token is never a target (vLLM gives none after a "length" answer)
    assert_cached_targets_are_live(teacher, data, 4, lambda record: 1)


def test_a_sample_does_not_depend_on_the_batching(fake_vllm, teacher_dir):
    tokenizer = word_tokenizer()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    kwargs = dict(max_new_tokens=5, temperature=0.9, top_p=1.0, seed=11, eos_token_id=tokenizer.eos_token_id)
    sampler = VLLMSampler(teacher_dir)
    whole = {s.index: s.new_ids for s in sampler.sample(prompts, batch_size=5, **kwargs)}
    split = {s.index: s.new_ids for s in sampler.sample(prompts, batch_size=2, **kwargs)}
    assert whole == split
    # the streams name the samples: a resumed run's subset draws what the whole list drew
    tail = {s.index + 3: s.new_ids for s in sampler.sample(prompts[3:], batch_size=1, streams=[3, 4], **kwargs)}
    assert tail == {index: whole[index] for index in (3, 4)}
    assert len({stream_seed(11, stream) for stream in range(1000)}) == 1000
    assert stream_seed(11, 0) != stream_seed(12, 0)


def _output(prompt, generated, finish, k=2, vocab=10):
    """A vLLM answer with made-up, consistent log-probs (token t ranks first at every position)."""
    def entries(actual):
        logprobs = torch.log_softmax(torch.arange(vocab, dtype=torch.float32) * 0.1, -1)
        return _entries(logprobs, k, actual)

    answer = types.SimpleNamespace(token_ids=generated, logprobs=[entries(t) for t in generated], finish_reason=finish)
    return types.SimpleNamespace(prompt_logprobs=[None] + [entries(t) for t in prompt[1:]], outputs=[answer])


def test_eos_and_length_answers_give_one_row_per_token():
    prompt = [1, 5, 6]
    eos = sample_of(0, prompt, _output(prompt, [7, 8, 2], "stop"), 2, 2)
    assert eos.finish == "eos" and eos.new_ids == [7, 8] and eos.topk_logprobs.shape == (5, 2)
    cut = sample_of(0, prompt, _output(prompt, [7, 8, 9], "length"), 2, 2)
    assert cut.finish == "length" and cut.new_ids == [7, 8, 9] and cut.topk_indices.shape == (6, 2)
    assert torch.equal(cut.topk_logprobs[-1], cut.topk_logprobs[-2])  # no distribution after the last token
    assert sample_of(0, prompt, _output(prompt, [7, 2], "stop"), 2, None).topk_logprobs is None


def test_misaligned_answers_are_refused():
    prompt = [1, 5, 6]
    output = _output(prompt, [7, 8], "length")
    output.outputs[0].logprobs[1] = {3: Logprob(-1.0, 1), 4: Logprob(-2.0, 2)}  # the sampled 8 is missing
    with pytest.raises(ValueError, match="not among"):
        sample_of(0, prompt, output, 2, 2)
    short = _output(prompt, [7, 8], "length")
    short.outputs[0].logprobs = short.outputs[0].logprobs[:1]
    with pytest.raises(ValueError, match="1 of 2 generated"):
        sample_of(0, prompt, short, 2, 2)
    with pytest.raises(ValueError, match="other than EOS"):
        sample_of(0, prompt, _output(prompt, [7, 8], "stop"), 2, 2)


def test_bad_engine_settings_are_refused(monkeypatch, teacher_dir, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(InputError, match="engine vllm needs vllm"):
        next(VLLMSampler(teacher_dir).sample([[1, 2]], max_new_tokens=2, temperature=1.0, top_p=1.0, seed=0,
                                             eos_token_id=None))
    out = tmp_path / "s.jsonl"
    with pytest.raises(InputError, match="engine vllm needs vllm"):
        from slimlm.pipeline.synthetic import generate_stage

        generate_stage(_teacher(teacher_dir), word_tokenizer(), PROMPTS, str(out), max_new_tokens=2,
                       writing={"engine": "vllm"}, model_path=teacher_dir, progress=False)
    assert list(tmp_path.iterdir()) == []  # refused before anything was staged
    with pytest.raises(InputError, match="Hugging Face folder"):
        model_folder(_teacher(teacher_dir), tmp_path / "model.gguf")
    assert model_folder(_teacher(teacher_dir), None) == str(teacher_dir)
    with pytest.raises(InputError, match="engine_args.*JSON"):
        GenerationOptions(engine="vllm", engine_args="{tensor_parallel_size: 2")
    with pytest.raises(InputError, match="engine_args.*JSON object"):
        GenerationOptions(engine="vllm", engine_args="[2]")
    with pytest.raises(InputError, match="engine_args.*vllm only"):
        GenerationOptions(engine="slimlm", engine_args='{"enforce_eager": true}')
    assert GenerationOptions(engine="vllm", engine_args='{"enforce_eager": true}').writing()["engine_args"]


def test_slimlm_generate_through_vllm(fake_vllm, teacher_dir, tmp_path, capsys):
    from slimlm import cli

    prompts, out = tmp_path / "prompts.txt", tmp_path / "synthetic.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["generate", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out), "--engine", "vllm",
            "--max-new-tokens", "4", "--min-new-tokens", "0", "--keep-topk", "4", "--no-filters", "--no-progress",
            "--precision", "float32"]
    code = cli.main(argv + ["--engine-args", "[1]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--engine-args" in err[0] and not out.exists()
    assert cli.main(argv + ["--engine-args", '{"enforce_eager": true}']) == 0, capsys.readouterr().err
    assert FakeLLM.started[-1]["enforce_eager"] is True
    records = [json.loads(line) for line in out.read_text().splitlines() if line]
    assert records and all(record["sampling"]["seed"] == 0 for record in records)
    (folder,) = [path for path in (tmp_path / "synthetic.jsonl.topk").iterdir() if path.is_dir()]
    assert load_teacher_topk(folder).num_sequences == len(records)
    done = json.loads((tmp_path / "synthetic.jsonl.done.json").read_text())
    assert done["inputs"]["sampling"]["engine"] == "vllm"


@pytest.fixture
def fake_server(teacher_dir):
    """A stand-in vLLM OpenAI-compatible server on loopback: /v1/models, /version and
    /v1/completions answered by ``FakeLLM`` in vLLM's JSON shapes."""
    import threading
    from http.server import ThreadingHTTPServer

    llm, lock, seen = FakeLLM(str(teacher_dir)), threading.Lock(), []

    def as_json(entries):
        return {f"token_id:{token}": entry.logprob for token, entry in entries.items()}

    class Handler(JSONHandler):
        def answer(self, body):
            self._send(200, body)

        def do_GET(self):
            if self.path == "/v1/models":
                return self.answer({"data": [{"id": str(teacher_dir), "root": str(teacher_dir)}]})
            return self.answer({"version": "0.0-test"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            params = SamplingParams(max_tokens=body["max_tokens"], temperature=body["temperature"], seed=body["seed"],
                                    logprobs=body["logprobs"], prompt_logprobs=body.get("prompt_logprobs"),
                                    stop_token_ids=body.get("stop_token_ids"), ignore_eos=body["ignore_eos"],
                                    detokenize=False)
            with lock:
                output = llm._one(body["prompt"], params)
            answer = output.outputs[0]
            prompt = None if output.prompt_logprobs is None else [None] + [
                {str(token): {"logprob": entry.logprob, "rank": entry.rank} for token, entry in position.items()}
                for position in output.prompt_logprobs[1:]]
            self.answer({"choices": [{"index": 0, "finish_reason": answer.finish_reason, "prompt_logprobs": prompt,
                                      "logprobs": {"tokens": [f"token_id:{t}" for t in answer.token_ids],
                                                   "top_logprobs": [as_json(step) for step in answer.logprobs]}}]})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_generation_through_a_vllm_server_writes_the_same_cache(fake_server, teacher_dir, tmp_path, monkeypatch):
    url, seen = fake_server
    teacher = _teacher(teacher_dir)
    prompts = [("data", p) for p in PROMPTS[:3]]
    kwargs = dict(max_new_tokens=5, min_new_tokens=0, progress=False, filters=False, dedupe=False, engine="vllm",
                  keep_topk=4, seed=5, batch_size=2)
    served = generate_synthetic(teacher, word_tokenizer(), prompts, out_path=tmp_path / "s.jsonl", server=url,
                                model_path=teacher_dir, cache_dir=tmp_path / "cache", **kwargs)
    assert len(seen) == 3 and all(body["model"] == str(teacher_dir) and body["prompt_logprobs"] == 4 for body in seen)
    assert len({body["seed"] for body in seen}) == 3
    assert_cached_targets_are_live(teacher, served, 4, lambda record: 1)
    # the same requests as the engine in process: the same samples
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=SamplingParams))
    local = generate_synthetic(teacher, word_tokenizer(), prompts, out_path=tmp_path / "l.jsonl",
                               model_path=teacher_dir, cache_dir=tmp_path / "local", **kwargs)
    assert [r["ids"] for r in served.records] == [r["ids"] for r in local.records]


def test_server_options_are_checked():
    with pytest.raises(InputError, match="server.*vllm only"):
        GenerationOptions(server="http://localhost:8000")
    with pytest.raises(InputError, match="server.*http"):
        GenerationOptions(engine="vllm", server="localhost:8000")
    with pytest.raises(InputError, match="server_model.*give it too"):
        GenerationOptions(engine="vllm", server_model="m")
    with pytest.raises(InputError, match="engine_args"):
        GenerationOptions(engine="vllm", server="http://h:1", engine_args='{"a": 1}')
