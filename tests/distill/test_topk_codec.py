"""TopKCodec: byte-exact against the one-record-at-a-time reference, exact ids, bounded
probability error, fixed sizes, clear errors for bad input and corrupt records."""
import math
import time

import pytest
import torch

from slimlm.distill import topk_codec
from slimlm.distill.topk_codec import MASS_LOGIT_RANGE, MASS_STEP, TopKCodec, decode_reference, encode_reference

KS = (1, 2, 7, 16, 32, 64)
VOCABS = (2, 100, 49152, 65537, 151936, 2**20)


def random_topk(rows: int, k: int, vocab: int, seed: int = 0):
    """(rows, k) descending log-probs of distributions from flat to peaked, with a tail mass
    (none when k = V), and distinct ids; row 0 holds the ids 0 and V − 1."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(rows)])
    if k >= 2:
        ids[0, :2] = torch.tensor([0, vocab - 1])
        ids[0, 2:] = torch.randperm(vocab - 2, generator=gen)[:k - 2] + 1
    scale = torch.tensor([0.1, 1.0, 3.0, 8.0, 20.0])[torch.arange(rows) % 5, None]
    logits = torch.randn(rows, k + 1, generator=gen, dtype=torch.float64) * scale
    if k == vocab:
        logits[:, -1] = -math.inf
    logprobs = torch.log_softmax(logits, -1)[:, :k].sort(-1, descending=True).values
    return logprobs.float(), ids


def mass_code(records: torch.Tensor) -> torch.Tensor:
    return records[:, 0].long() | records[:, 1].long() << 8


def by_id(logprobs: torch.Tensor, ids: torch.Tensor):
    order = ids.argsort(-1)
    return logprobs.gather(-1, order), ids.gather(-1, order)


def kl_with_tail(p_logprobs: torch.Tensor, q_logprobs: torch.Tensor) -> torch.Tensor:
    """Per row KL(P‖Q) over the k entries (paired by position) and the tail bucket 1 − Σ p."""
    p, q = p_logprobs.double(), q_logprobs.double()
    tail_p, tail_q = (-torch.expm1(p.logsumexp(-1))).clamp(min=0), (-torch.expm1(q.logsumexp(-1))).clamp(min=1e-300)
    head = torch.where(p > -math.inf, p.exp() * (p - q), torch.zeros_like(p)).sum(-1)
    return head + torch.where(tail_p > 0, tail_p * (tail_p.clamp(min=1e-300).log() - tail_q.log()), torch.zeros_like(tail_p))


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
def test_fast_codec_matches_the_reference_and_ids_round_trip(k, vocab):
    if k > vocab:
        pytest.skip("k > V")
    codec = TopKCodec(k, vocab)
    logprobs, ids = random_topk(20, k, vocab, seed=k * 7 + vocab % 97)
    records = codec.encode(logprobs, ids)
    assert records.dtype == torch.uint8 and records.shape == (20, codec.record_bytes)
    reference_records = encode_reference(codec, logprobs, ids)
    assert torch.equal(records[:, 2:], reference_records[:, 2:])
    assert int((mass_code(records) - mass_code(reference_records)).abs().max()) <= 1  # sums rounded apart
    decoded, reference = codec.decode(records), decode_reference(codec, records)
    assert torch.equal(decoded.ids, reference.ids) and decoded.ids.dtype == torch.int32
    torch.testing.assert_close(decoded.logprobs, reference.logprobs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(decoded.tail, reference.tail, rtol=1e-6, atol=1e-12)
    assert torch.equal(decoded.ids.long().sort(-1).values, ids.sort(-1).values)
    assert bool((decoded.logprobs.diff(dim=-1) <= 0).all())
    torch.testing.assert_close(decoded.tail.double(), -torch.expm1(decoded.logprobs.double().logsumexp(-1)),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", (16, 64))
def test_probability_error_is_bounded(k):
    codec = TopKCodec(k, 49152)
    logprobs, ids = random_topk(400, k, 49152, seed=1)
    decoded = codec.decode(codec.encode(logprobs, ids))
    lp, _ = by_id(logprobs.double(), ids)
    dec, dec_ids = by_id(decoded.logprobs.double(), decoded.ids.long())
    assert torch.equal(dec_ids, ids.sort(-1).values)
    # companded relative probabilities (p / p_max)^γ: within half a step, or the lowest level
    gamma, levels = codec.power, codec.levels
    exact = ((lp - lp.max(-1, keepdim=True).values) * gamma).exp()
    decoded_companded = ((dec - dec.max(-1, keepdim=True).values) * gamma).exp()
    above = exact >= 0.5 / levels
    assert float((decoded_companded - exact)[above].abs().max()) <= 0.5 / levels + 1e-6
    torch.testing.assert_close(decoded_companded[~above], torch.full_like(decoded_companded[~above], 1 / levels))
    # the mass S and the tail 1 − S: relative error <= half a step of their logit
    mass, mass_hat = lp.logsumexp(-1), dec.logsumexp(-1)
    assert float((mass_hat - mass).abs().max()) <= MASS_STEP / 2 + 1e-6
    tail = torch.log(-torch.expm1(mass))
    kept = tail > MASS_LOGIT_RANGE[0] + 1  # smaller tails (below fp32 resolution) clamp to e^-24
    assert float((decoded.tail.double().log() - tail)[kept].abs().max()) <= MASS_STEP / 2 + 1e-4
    assert bool((decoded.tail[~kept].double().log() <= MASS_LOGIT_RANGE[0] + 1 + MASS_STEP).all())
    # the top entry's log-prob: the mass error plus the renormalisation, a few hundredths of a nat
    assert float((decoded.logprobs[:, 0].double() - logprobs[:, 0].double()).abs().max()) < 0.05
    assert float(kl_with_tail(lp, dec).mean()) < 1e-3


def test_fixed_record_sizes():
    assert [TopKCodec(k, 49152).record_bytes for k in (16, 32, 64)] == [41, 76, 142]
    codec = TopKCodec(64, 49152)
    assert (codec.low_bits, codec.high_bits, codec.record_bits) == (9, 159, 1135)
    assert TopKCodec(1, 1).record_bytes == 3 and TopKCodec(2, 2, prob_bits=8).record_bytes == 5
    logprobs, ids = random_topk(12, 64, 49152)
    records = codec.encode(logprobs.reshape(3, 4, 64), ids.reshape(3, 4, 64))
    assert records.shape == (3, 4, 142)
    decoded = codec.decode(records)
    assert decoded.logprobs.shape == decoded.ids.shape == (3, 4, 64) and decoded.tail.shape == (3, 4)


def test_ties_and_column_order_do_not_matter():
    """Equal log-probs decode equal, in ascending id order; permuting the k columns of the input
    gives the same bytes (the record holds a set)."""
    codec = TopKCodec(7, 100)
    ids = torch.tensor([[50, 3, 99, 0, 42, 7, 8]])
    logprobs = torch.full((1, 7), math.log(0.1))
    records = codec.encode(logprobs, ids)
    decoded = codec.decode(records)
    assert decoded.ids.tolist() == [[0, 3, 7, 8, 42, 50, 99]]
    torch.testing.assert_close(decoded.logprobs, logprobs, rtol=0, atol=2e-3)
    assert len(set(decoded.logprobs[0].tolist())) == 1
    codec = TopKCodec(16, 65537)
    logprobs, ids = random_topk(10, 16, 65537, seed=3)
    permutation = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    records = codec.encode(logprobs, ids)
    assert torch.equal(records, codec.encode(logprobs[:, permutation], ids[:, permutation]))
    assert torch.equal(records, codec.encode(logprobs, ids))


def test_zero_probabilities_and_a_zero_tail():
    """k beyond the support: the -inf entries come back -inf, after the others, with their ids."""
    codec = TopKCodec(7, 100)
    full = torch.full((2, 100), -math.inf)
    full[0, [4, 9, 60]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    full[1, 10:17] = torch.log_softmax(torch.arange(7.0), -1)
    top = full.topk(7, -1)
    decoded = codec.decode(codec.encode(top.values, top.indices))
    assert decoded.ids[0, :3].tolist() == [4, 9, 60] and set(decoded.ids[0, 3:].tolist()) == set(top.indices[0, 3:].tolist())
    assert bool(torch.isneginf(decoded.logprobs[0, 3:]).all()) and bool(torch.isfinite(decoded.logprobs[0, :3]).all())
    torch.testing.assert_close(decoded.logprobs[0, :3], top.values[0, :3], rtol=0, atol=0.03)
    assert bool((decoded.tail < 1e-7).all())  # what the fp32 log-probs leave out
    torch.testing.assert_close(decoded.logprobs[1].exp().sum(), torch.tensor(1.0))
    certain = TopKCodec(1, 100).decode(TopKCodec(1, 100).encode(torch.zeros(1, 1), torch.tensor([[5]])))
    assert certain.tail.tolist() == [0.0] and certain.logprobs.tolist() == [[0.0]]


def test_flat_distribution_over_a_large_vocabulary_keeps_its_small_mass():
    codec = TopKCodec(1, 2**20)
    logprobs = torch.full((1, 1), -math.log(2**20))
    decoded = codec.decode(codec.encode(logprobs, torch.tensor([[123456]])))
    torch.testing.assert_close(decoded.logprobs, logprobs, rtol=0, atol=MASS_STEP)
    assert decoded.ids.tolist() == [[123456]] and 0 < 1 - float(decoded.tail) < 2e-6


def test_deterministic_and_independent_of_chunking(monkeypatch):
    codec = TopKCodec(32, 151936)
    logprobs, ids = random_topk(50, 32, 151936, seed=5)
    records = codec.encode(logprobs, ids)
    decoded = codec.decode(records)
    monkeypatch.setattr(topk_codec, "CHUNK_ROWS", 7)
    assert torch.equal(codec.encode(logprobs, ids), records)
    chunked = codec.decode(records)
    assert all(torch.equal(a, b) for a, b in zip(chunked, decoded))
    assert codec.encode(logprobs[:0], ids[:0]).shape == (0, codec.record_bytes)
    assert codec.decode(records[:0]).logprobs.shape == (0, 32)


def test_params_round_trip():
    codec = TopKCodec(32, 151936, prob_bits=5, power=0.25)
    assert TopKCodec.from_params(codec.params()) == codec
    with pytest.raises(ValueError, match="record_bytes"):
        TopKCodec.from_params({**codec.params(), "record_bytes": 99})
    with pytest.raises(ValueError, match="is not 'slimlm.topk_codec/1'"):
        TopKCodec.from_params({**codec.params(), "codec": "other/2"})
    with pytest.raises(ValueError, match="lack field 'power'"):
        TopKCodec.from_params({key: value for key, value in codec.params().items() if key != "power"})


@pytest.mark.parametrize("arguments,message", [
    ((65, 64), r"k must be in \[1, vocab_size = 64\], got 65"),
    ((0, 64), r"k must be in \[1, vocab_size = 64\], got 0"),
    ((4, 2**31), r"vocab_size must be in \[1, 2\*\*31\)"),
    ((4, 64, 1), r"prob_bits must be in \[2, 16\]"),
    ((4, 64, 6, 1.5), r"power must be in \(0, 1\]"),
    ((4.0, 64), "k must be an int"),
])
def test_bad_codec_parameters(arguments, message):
    with pytest.raises(ValueError, match=message):
        TopKCodec(*arguments)


def test_bad_inputs_are_refused():
    codec = TopKCodec(4, 100)
    good = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05]]))
    ids = torch.tensor([[5, 6, 7, 8]])
    cases = [
        (good, torch.tensor([[5, 6, 7, 100]]), r"ids must lie in \[0, 100\), got ids in \[5, 100\]"),
        (good, torch.tensor([[5, -1, 7, 8]]), r"ids must lie in \[0, 100\)"),
        (good, torch.tensor([[5, 6, 5, 8]]), r"row 0: ids must be distinct"),
        (good[:, :3], ids[:, :3], r"must both be \(\.\.\., k = 4\)"),
        (good, ids.float(), "ids must be an integer tensor"),
        (good.long(), ids, "logprobs must be a float tensor"),
        (good.masked_fill(torch.tensor([[False, True, False, False]]), math.nan), ids, "NaN"),
        (good + 1.0, ids, "a value of 0.0"),
        (torch.randn(1, 4).abs().neg() * 0.01, ids, r"row 0: the top-k probabilities sum to 3\.9"),
        (torch.full((1, 4), -math.inf), ids, "sum to 0"),
    ]
    for logprobs, index, message in cases:
        with pytest.raises(ValueError, match=message):
            codec.encode(logprobs, index)


def test_corrupt_records_are_refused():
    codec = TopKCodec(16, 49152)
    logprobs, ids = random_topk(6, 16, 49152)
    records = codec.encode(logprobs, ids)
    with pytest.raises(ValueError, match=r"records must be uint8 \(\.\.\., 41\)"):
        codec.decode(records[:, :40])
    with pytest.raises(ValueError, match=r"records must be uint8"):
        codec.decode(records.to(torch.int16))
    high_start = 2  # the unary part begins at bit 16: byte 2
    extra_id = records.clone()
    extra_id[3, high_start] ^= 0xFF
    with pytest.raises(ValueError, match=r"record 3 is corrupt: \d+ ids where there must be 16"):
        codec.decode(extra_id)
    no_top = records.clone()
    no_top[4, -12:] = 0  # the last 12 bytes: probability codes only
    with pytest.raises(ValueError, match="record 4 is corrupt: no probability code is the top's, 63"):
        codec.decode(no_top)
    large = TopKCodec(2, 100)  # l = 5, V − 1 >> 5 = 3: the unary part can name ids up to 127
    record = large.encode(torch.log(torch.tensor([[0.6, 0.3]])), torch.tensor([[10, 99]]))
    bits = int.from_bytes(bytes(record[0].tolist()), "little") | (0b11111 << (16 + large.high_bits + 5))
    with pytest.raises(ValueError, match=r"record 0 is corrupt: ids \[10, 127\] are not distinct ids below 100"):
        large.decode(torch.tensor([list(bits.to_bytes(large.record_bytes, "little"))], dtype=torch.uint8))


def test_throughput_is_millions_of_entries_per_second():
    codec = TopKCodec(64, 49152)
    logprobs, ids = random_topk(256, 64, 49152)
    logprobs, ids = logprobs.repeat(64, 1), ids.repeat(64, 1)  # 16384 tokens, 1M entries

    def best(fn):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return result, min(times)

    records, encode_s = best(lambda: codec.encode(logprobs, ids))
    _, decode_s = best(lambda: codec.decode(records))
    assert logprobs.numel() / encode_s > 2e6 and logprobs.numel() / decode_s > 2e6, (encode_s, decode_s)


@pytest.mark.slow
def test_real_teacher_fits_the_budget():
    """SmolLM2-135M-Instruct on README.md, k = 64: <= 150 bytes/token and KL(top-k + tail ‖
    decoded) <= 0.005 nats/token (scripts/topk_cache_quality.py measures ~3e-4)."""
    import pathlib

    from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path

    path = smollm2_gguf_path()
    model, tokenizer = load_model(path, dtype=torch.float32).eval(), load_tokenizer(path)
    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    with torch.no_grad():
        top = torch.log_softmax(model(ids).logits[0].float(), -1).topk(64, -1)
    codec = TopKCodec(64, model.config.vocab_size)
    decoded = codec.decode(codec.encode(top.values, top.indices))
    exact, exact_ids = by_id(top.values, top.indices)
    cached, cached_ids = by_id(decoded.logprobs, decoded.ids.long())
    assert torch.equal(exact_ids, cached_ids) and codec.record_bytes <= 150
    assert float(kl_with_tail(exact, cached).mean()) <= 0.005
