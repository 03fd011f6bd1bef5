"""sample(): greedy-equivalent runs reproduce transformers' greedy generate, the kept top-k is the
live teacher's, samples depend on (seed, prompt) only — not on batch size or order — and stop at
EOS or the length; nucleus sampling is exactly transformers' top-p; bad inputs are refused."""
import copy

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from slimlm.distill import sampler
from slimlm.distill.sampler import Sample, sample
from slimlm.errors import InputError
from tiny import cast_weights, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5
NEW = 6
EOS = 1  # the "training" preset's eos_token_id
LENGTHS = [4, 7, 3, 9, 5, 7, 2, 6, 8, 4, 5]


def tiny(model_type: str = "llama", attention: str = "sdpa"):
    """A tiny random teacher (vocab 64) whose logits are spread enough to sample varied text."""
    model = tiny_model(model_type, "training", seed=1, initializer_range=0.2)
    model.set_attn_implementation(attention)
    return model


@pytest.fixture(scope="module")
def teacher():
    return tiny()


def prompts(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (n,), generator=gen).tolist() for n in lengths]


def by_index(samples) -> list[Sample]:
    return sorted(samples, key=lambda drawn: drawn.index)


def live_log_probs(model, drawn: Sample) -> torch.Tensor:
    """log_softmax of the model's logits over prompt + new tokens, in one unbatched forward."""
    with torch.no_grad():
        logits = model(torch.tensor([drawn.prompt_ids + drawn.new_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.mark.parametrize("model_type,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                                  ("mistral", "sdpa")])
def test_near_zero_temperature_is_greedy_generate(model_type, attention):
    model = tiny(model_type, attention)
    drawn = by_index(sample(model, prompts(), max_new_tokens=NEW, temperature=1e-5, batch_size=4, eos_token_id=EOS))
    assert [d.index for d in drawn] == list(range(len(LENGTHS)))
    for item in drawn:
        with torch.no_grad():
            greedy = model.generate(torch.tensor([item.prompt_ids]), do_sample=False, max_new_tokens=NEW,
                                    eos_token_id=EOS, pad_token_id=0)[0, len(item.prompt_ids):].tolist()
        expected = greedy[:greedy.index(EOS)] if EOS in greedy else greedy
        assert item.new_ids == expected
        assert item.finish == ("eos" if EOS in greedy else "length")


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_topk_is_the_live_teachers_in_float32(model_type):
    model = tiny(model_type)
    for item in sample(model, prompts(), max_new_tokens=NEW, temperature=1.0, batch_size=4, eos_token_id=None,
                       keep_topk=K):
        rows = len(item.prompt_ids) + len(item.new_ids)
        assert item.topk_logprobs.shape == (rows, K) and item.topk_logprobs.dtype == torch.float32
        assert item.topk_indices.shape == (rows, K) and item.topk_indices.dtype == torch.int64
        live = live_log_probs(model, item).topk(K, dim=-1)
        assert torch.equal(item.topk_indices, live.indices)
        torch.testing.assert_close(item.topk_logprobs, live.values, rtol=0, atol=2e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_prompts_prefilled_in_chunks_give_the_same_samples(monkeypatch, model_type):
    """Long prompts go through in column chunks (here 2 columns for 4 rows); a sliding window
    (mistral's, 5 tokens) shorter than the prompts must see the same keys as in one pass."""
    model = tiny(model_type)
    settings = dict(max_new_tokens=NEW, temperature=1.0, batch_size=4, eos_token_id=None, keep_topk=K)
    whole = {item.index: item for item in sample(model, prompts(), **settings)}
    monkeypatch.setattr(sampler, "PREFILL_LOGITS", 4 * 64 * 2)
    for item in sample(model, prompts(), **settings):
        assert item.new_ids == whole[item.index].new_ids
        assert torch.equal(item.topk_indices, whole[item.index].topk_indices)
        torch.testing.assert_close(item.topk_logprobs, whole[item.index].topk_logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_shared_prefix_computed_once_gives_the_same_samples(model_type):
    """Chat prompts share a system prompt: the batch computes it once (llama; mistral's sliding
    window keeps the plain layout). Each sample equals the prompt's run alone."""
    model = tiny(model_type)
    head = prompts([6])[0]
    given = [head + rest for rest in prompts([3, 1, 5, 2, 4], seed=1)] + [head[:4], head, head + [7]]
    settings = dict(max_new_tokens=NEW, temperature=1.0, eos_token_id=None, keep_topk=K)
    together = {item.index: item for item in sample(model, given, batch_size=len(given), **settings)}
    for item in sample(model, given, batch_size=1, **settings):
        assert together[item.index].new_ids == item.new_ids
        assert torch.equal(together[item.index].topk_indices, item.topk_indices)
        torch.testing.assert_close(together[item.index].topk_logprobs, item.topk_logprobs, rtol=0, atol=2e-5)


def test_topk_in_bfloat16_is_within_bfloat16_rounding(teacher):
    """Against the float32 teacher, the bf16 run errs no more than twice a plain bf16 forward does."""
    plain_bf16 = cast_weights(teacher, torch.bfloat16)
    for item in sample(teacher, prompts(), max_new_tokens=NEW, batch_size=4, eos_token_id=None, keep_topk=K,
                       dtype=torch.bfloat16):
        exact = live_log_probs(teacher, item).gather(-1, item.topk_indices)
        rounded = live_log_probs(plain_bf16, item).gather(-1, item.topk_indices)
        assert (item.topk_logprobs - exact).abs().max() <= 2 * (rounded - exact).abs().max() + 1e-3
    assert next(teacher.parameters()).dtype == torch.float32


def test_the_callers_model_is_untouched(teacher):
    before = copy.deepcopy(teacher.state_dict())
    teacher.train()
    list(sample(teacher, prompts()[:3], max_new_tokens=2, eos_token_id=None, dtype=torch.bfloat16))
    assert teacher.training and teacher.config._attn_implementation == "sdpa"
    assert all(torch.equal(value, before[key]) for key, value in teacher.state_dict().items())
    teacher.eval()


def test_same_seed_same_samples_whatever_the_batching(teacher):
    runs = []
    for batch_size, order in [(1, None), (3, None), (8, None), (3, [5, 0, 10, 2, 8, 1, 9, 3, 7, 4, 6])]:
        given = prompts()
        order = order or list(range(len(given)))
        drawn = sample(teacher, [given[i] for i in order], max_new_tokens=NEW, temperature=1.0, top_p=0.9, seed=11,
                       batch_size=batch_size, eos_token_id=None, keep_topk=K)
        runs.append({order[item.index]: item for item in drawn})
    first = runs[0]
    assert len({tuple(item.new_ids) for item in first.values()}) > 1, "the samples should differ between prompts"
    for other in runs[1:]:
        assert {i: item.new_ids for i, item in other.items()} == {i: item.new_ids for i, item in first.items()}
        for index, item in other.items():
            assert torch.equal(item.topk_indices, first[index].topk_indices)
            torch.testing.assert_close(item.topk_logprobs, first[index].topk_logprobs, rtol=0, atol=1e-5)
    reseeded = {item.index: item.new_ids for item in sample(teacher, prompts(), max_new_tokens=NEW, temperature=1.0,
                                                            top_p=0.9, seed=12, eos_token_id=None)}
    assert reseeded != {i: item.new_ids for i, item in first.items()}


def test_eos_stops_a_row_and_the_others_run_to_the_length(teacher):
    """A token drawn mid-sample, made the EOS: rows stop before its first draw (the same prefix, as
    randomness is per prompt and step), the rest are unchanged by their neighbours leaving the batch."""
    settings = dict(max_new_tokens=NEW, temperature=1.0, top_p=1.0, seed=5, batch_size=len(LENGTHS), keep_topk=K)
    free = {item.index: item for item in sample(teacher, prompts(), eos_token_id=None, **settings)}
    assert all(item.finish == "length" and len(item.new_ids) == NEW for item in free.values())
    counts = torch.bincount(torch.tensor([t for item in free.values() for t in item.new_ids[1:]]), minlength=64)
    eos = int(counts.argmax())
    stopped = {item.index: item for item in sample(teacher, prompts(), eos_token_id=eos, **settings)}
    assert {item.finish for item in stopped.values()} == {"eos", "length"}
    for index, item in stopped.items():
        ids = free[index].new_ids
        if eos in ids:
            assert item.finish == "eos" and item.new_ids == ids[:ids.index(eos)]
        else:
            assert item.finish == "length" and item.new_ids == ids
        rows = len(item.prompt_ids) + len(item.new_ids)
        assert item.topk_logprobs.shape == (rows, K)
        torch.testing.assert_close(item.topk_logprobs, free[index].topk_logprobs[:rows], rtol=0, atol=1e-5)


def test_one_row_runs_alone_and_one_token(teacher):
    (item,) = sample(teacher, [[5]], max_new_tokens=1, eos_token_id=None, keep_topk=3)
    assert item.index == 0 and item.prompt_ids == [5] and len(item.new_ids) == 1 and item.finish == "length"
    assert item.topk_logprobs.shape == (2, 3)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 0.5), (1.3, 0.999), (0.8, 1.0)])
def test_draw_is_transformers_top_p_by_inverse_transform(monkeypatch, temperature, top_p):
    """Whatever the candidate sizes (here small, so rows fall through to wider top-k and the full
    sort), each draw is the token at u of the nucleus that transformers' top-p keeps, renormalised."""
    monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", (2, 5))
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=gen) * torch.linspace(0.3, 4.0, 64)[:, None]
    uniforms = torch.rand(64, generator=gen)
    tokens, kept = sampler._draw(logits, uniforms, temperature, top_p, keep_topk=4)
    warped = TopPLogitsWarper(top_p)(None, logits / temperature)
    probs, order = torch.softmax(warped, dim=-1).sort(dim=-1, descending=True)
    choice = torch.searchsorted(probs.cumsum(-1), uniforms[:, None], right=True).clamp_(max=49)
    expected = order.gather(-1, choice).squeeze(-1)
    if top_p == 1.0:  # the whole vocabulary, drawn in index order: a different but equally exact inverse
        cumulative = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
        expected = torch.searchsorted(cumulative, uniforms[:, None], right=True).squeeze(-1)
    assert torch.equal(tokens, expected)
    top = torch.log_softmax(logits, dim=-1).topk(4, dim=-1)
    assert torch.equal(kept[1], top.indices)
    torch.testing.assert_close(kept[0], top.values, rtol=0, atol=1e-6)


def test_packed_linear_is_exact_where_used():
    linear = torch.nn.Linear(24, 40).to(torch.bfloat16)
    packed = sampler._PackedLinear.of(linear)
    if packed is linear:
        pytest.skip("no native bf16 oneDNN linear on this machine")
    hidden = torch.randn(3, 7, 24).to(torch.bfloat16)
    assert torch.equal(packed(hidden), linear(hidden))


def test_decode_attention_matches_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Attention(torch.nn.Module):
        num_key_value_groups = 3
        is_causal = True

    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=gen) for shape in [(4, 6, 5, 8), (4, 2, 9, 8), (4, 2, 9, 8)])
    mask = torch.ones(4, 1, 5, 9, dtype=torch.bool).tril(diagonal=4)
    mask[1, :, :, :3] = False  # left padding: the first query of row 1 sees no key before its own
    mask[1, :, :, 2] = True
    # Masked prompt and decode step; without a mask, a causal prompt (square) and a decode step.
    cases = [(query, key, value, mask), (query[:, :, -1:], key, value, mask[:, :, -1:]),
             (query, key[:, :, :5], value[:, :, :5], None), (query[:, :, -1:], key, value, None)]
    for arguments in cases:
        ours, _ = sampler.decode_attention(Attention(), *arguments)
        theirs, _ = sdpa_attention_forward(Attention(), *arguments)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("given,kwargs,message", [
    ([], {}, "no prompts given"),
    ([[3, 4], []], {}, "prompt 1 is empty"),
    ([[3]], dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    ([[3]], dict(temperature=0.0), "temperature must be > 0, got 0.0"),
    ([[3]], dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    ([[3]], dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    ([[3]], dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
    ([[3]], dict(keep_topk=0), r"keep_topk must be None or an int in \[1, 64\]"),
    ([[3], [4] * 125], dict(max_new_tokens=4), "prompt 1 has 125 tokens; with max_new_tokens=4 it exceeds the "
                                               "model's max_position_embeddings of 128"),
])
def test_bad_inputs_are_refused_in_one_line(teacher, given, kwargs, message):
    with pytest.raises(InputError, match=message) as error:
        sample(teacher, given, **{"max_new_tokens": NEW, "eos_token_id": EOS, **kwargs})
    assert "\n" not in str(error.value)


def test_streams_name_the_draws_of_repeated_prompts(teacher):
    """Identical prompts draw from streams 0, 1, 2, ... in list order; ``streams`` picks one for a
    prompt sampled on its own (a resumed run), and must name one per prompt."""
    prompt = prompts([5])[0]
    settings = dict(max_new_tokens=NEW, temperature=1.0, eos_token_id=None)
    repeated = by_index(sample(teacher, [prompt] * 3, **settings))
    assert len({tuple(item.new_ids) for item in repeated}) == 3
    (alone,) = sample(teacher, [prompt], streams=[2], **settings)
    assert alone.new_ids == repeated[2].new_ids
    with pytest.raises(InputError, match="streams names 2 streams for 1 prompts"):
        sample(teacher, [prompt], streams=[0, 1], **settings)
