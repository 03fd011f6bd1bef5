"""A teacher's top-k distribution per token as a fixed-size byte record, and back.

``TopKCodec(k, vocab_size).encode(logprobs, ids)`` turns (..., k) log-probs and their distinct
vocabulary ids into (..., R) uint8 records, R = ``record_bytes``; ``decode`` gives (..., k) fp32
log-probs in descending order, their int32 ids and the tail mass 1 − Σ p (CPU tensors). Fixed
size, so the record of token t of a file sits at byte t·R. Vectorised (numpy bit matrices, one
pass per bit position, no loop per token: 10–25 million entries/s each way on one core);
``encode_reference`` / ``decode_reference`` spell the format out one record at a time.

Record layout, bits numbered from the least significant bit of byte 0:

=========================  =========================  =========================================
bits                       field                      content
=========================  =========================  =========================================
[0, 16)                    mass code                  the top-k mass S = Σ p_i as its logit
                                                      x = log S − log(1 − S), 16 bits uniform on
                                                      [−24, 24] (code 65535: a tail of exactly 0)
[16, 16 + H)               Elias–Fano high part       ids sorted ascending; id_i >> l in unary:
                                                      bit (id_i >> l) + i is set; H = k + (V−1 >> l)
next k·l                   Elias–Fano low parts       id_i & (2^l − 1), l bits each, ascending ids
next k·b                   probability codes          c_i = clamp(rint(M·(p_i / p_max)^γ), 1, M),
                                                      M = 2^b − 1, in ascending-id order; 0 = p_i = 0
rest of the last byte      zero
=========================  =========================  =========================================

l minimises k·l + (V−1 >> l) (it is floor(log2(V/k)) or next to it). k = 64, V = 49152: l = 9,
H = 159, so the ids take 735 bits (log2 C(49152, 64) ≈ 706 is the floor of any fixed-size code;
16-bit ids take 1024), the codes 384 (b = 6) and the record is 142 bytes, against 512 for fp32 +
int32.

Decoding renormalises: p̂_i = Ŝ · r̂_i / Σ_j r̂_j with r̂_i = (c_i / M)^(1/γ), so the decoded top-k
sums to the stored mass and the tail bucket 1 − Σ p̂ is the stored one. The order of equal codes
is by ascending id.

Why these choices (measured on SmolLM2-135M-Instruct's distributions over 4096 tokens of
README.md, ``scripts/topk_cache_quality.py``; KL of the top-k + tail bucket, nats/token):

- p relative to the top, companded by a power γ: KL(P‖P̂) ≈ Σ_i δp_i² / (2 p_i), so a uniform
  step in p^γ costs ∝ p^(1 − 2γ) per entry. √p (γ = 1/2) makes every entry cost the same, but
  the top 64 of a peaked distribution holds dozens of entries below (Δ/2)² · p_max whose
  rounding dominates; γ = 0.3 was best at k = 16 … 64 (k = 64, b = 6: γ = 1/2 1.4e-3, 1/3 3.4e-4,
  0.3 3.2e-4, 1/4 3.0e-4, uniform log-p over 20 nats 1.7e-3). b = 5 gives 1.3e-3, b = 7 8e-5.
- The mass as a logit keeps a relative precision of ±3.7e-4 on S and on 1 − S at once, where a
  bf16 tail rounds 1 − S to 1 for a flat distribution (k = 1, large V) and a bf16 S loses the
  small tails. Tails below e^-24 ≈ 4e-11 (under the fp32 resolution of the decoded log-probs,
  which the losses recompute the tail from) are stored as e^-24; S >= k/V > e^-24 always.
- The ids as an unordered set (Elias–Fano, 92 bytes at k = 64) and the codes in id order: the
  descending order is recovered from the codes, so it costs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

FORMAT = "slimlm.topk_codec/1"
MASS_BITS = 16
MASS_ZERO_TAIL = (1 << MASS_BITS) - 1
MASS_LOGIT_RANGE = (-24.0, 24.0)
MASS_STEP = (MASS_LOGIT_RANGE[1] - MASS_LOGIT_RANGE[0]) / (MASS_ZERO_TAIL - 1)
CHUNK_ROWS = 8192  # rows per bit matrix: ~10 MB at k = 64


class DecodedTopK(NamedTuple):
    logprobs: torch.Tensor  # (..., k) fp32, descending
    ids: torch.Tensor  # (..., k) int32
    tail: torch.Tensor  # (...) fp32, 1 − Σ exp(logprobs)


def elias_fano_low_bits(k: int, vocab_size: int) -> int:
    """The low-part width l minimising the Elias–Fano size k·l + k + ((V − 1) >> l)."""
    return min(range(max(vocab_size - 1, 1).bit_length() + 1), key=lambda low: k * low + ((vocab_size - 1) >> low))


@dataclass(frozen=True)
class TopKCodec:
    """The record format for top-``k`` distributions over ``vocab_size`` ids, with ``prob_bits``
    per probability and companding exponent ``power`` (see the module docstring)."""

    k: int
    vocab_size: int
    prob_bits: int = 6
    power: float = 0.3

    def __post_init__(self):
        for name in ("k", "vocab_size", "prob_bits"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if not 1 <= self.vocab_size < 2**31:
            raise ValueError(f"vocab_size must be in [1, 2**31), got {self.vocab_size}")
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"k must be in [1, vocab_size = {self.vocab_size}], got {self.k}")
        if not 2 <= self.prob_bits <= 16:
            raise ValueError(f"prob_bits must be in [2, 16], got {self.prob_bits}")
        if not isinstance(self.power, (int, float)) or not 0.0 < self.power <= 1.0:
            raise ValueError(f"power must be in (0, 1], got {self.power!r}")

    @property
    def low_bits(self) -> int:
        return elias_fano_low_bits(self.k, self.vocab_size)

    @property
    def high_bits(self) -> int:
        return self.k + ((self.vocab_size - 1) >> self.low_bits)

    @property
    def levels(self) -> int:
        """M: the largest probability code (the top entry's)."""
        return (1 << self.prob_bits) - 1

    @property
    def record_bits(self) -> int:
        return MASS_BITS + self.high_bits + self.k * (self.low_bits + self.prob_bits)

    @property
    def record_bytes(self) -> int:
        return (self.record_bits + 7) // 8

    def params(self) -> dict:
        """The JSON a reader rebuilds the codec from (``from_params``), with the derived sizes."""
        return {"codec": FORMAT, "k": self.k, "vocab_size": self.vocab_size, "prob_bits": self.prob_bits,
                "power": self.power, "low_bits": self.low_bits, "record_bytes": self.record_bytes}

    @classmethod
    def from_params(cls, params: dict) -> "TopKCodec":
        """The codec ``params()`` describes; ValueError naming the field for another format or size."""
        if not isinstance(params, dict) or params.get("codec") != FORMAT:
            raise ValueError(f"codec {params.get('codec') if isinstance(params, dict) else params!r} is not {FORMAT!r}")
        try:
            codec = cls(params["k"], params["vocab_size"], params["prob_bits"], params["power"])
        except KeyError as missing:
            raise ValueError(f"codec parameters lack field {missing}") from None
        for field in ("low_bits", "record_bytes"):
            if params.get(field) != getattr(codec, field):
                raise ValueError(f"codec field {field!r} is {params.get(field)!r}, {FORMAT} gives {getattr(codec, field)}")
        return codec

    def _layout(self) -> tuple[int, int, int]:
        """Bit offsets of the high part, the low parts and the probability codes."""
        high = MASS_BITS
        low = high + self.high_bits
        return high, low, low + self.k * self.low_bits

    # ------------------------------------------------------------------ checks
    def _check_arguments(self, logprobs, ids) -> None:
        if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
            raise ValueError(f"logprobs must be a float tensor, got {getattr(logprobs, 'dtype', type(logprobs))}")
        if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
        if logprobs.shape != ids.shape or logprobs.dim() < 1 or logprobs.shape[-1] != self.k:
            raise ValueError(f"logprobs {tuple(logprobs.shape)} and ids {tuple(ids.shape)} must both be (..., k = {self.k})")

    def _check_rows(self, values: np.ndarray, index: np.ndarray, first_row: int) -> None:
        """ValueError naming the first row that is not top-k log-probs of one distribution over [0, V)."""
        if index.min() < 0 or index.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got ids in [{index.min()}, {index.max()}]")
        if np.isnan(values).any() or (values > 1e-2).any():
            raise ValueError("logprobs must be log-probabilities (<= 0, -inf for a zero probability), got "
                             + ("NaN" if np.isnan(values).any() else f"a value of {values.max():.6g}"))
        mass = np.exp(values).sum(1)
        bad = np.flatnonzero((mass > 1.01) | (mass == 0))
        if bad.size:
            raise ValueError(f"row {first_row + bad[0]}: the top-k probabilities sum to {mass[bad[0]]:.6g}; they must "
                             "sum to a value in (0, 1] (log-probabilities of one distribution, not logits)")

    # ------------------------------------------------------------------ fast path
    def encode(self, logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(..., k) log-probs (any order, -inf for p = 0) and their distinct ids in [0, V) ->
        (..., R) uint8 records. Deterministic: the same input gives the same bytes."""
        self._check_arguments(logprobs, ids)
        values = logprobs.detach().reshape(-1, self.k).cpu()
        index = ids.detach().reshape(-1, self.k).cpu()
        records = np.empty((values.shape[0], self.record_bytes), dtype=np.uint8)
        for start in range(0, values.shape[0], CHUNK_ROWS):
            stop = start + CHUNK_ROWS
            records[start:stop] = self._encode_rows(values[start:stop].double().numpy(),
                                                    index[start:stop].long().numpy(), start)
        return torch.from_numpy(records).reshape(*logprobs.shape[:-1], self.record_bytes)

    def _encode_rows(self, values: np.ndarray, index: np.ndarray, first_row: int) -> np.ndarray:
        self._check_rows(values, index, first_row)
        rows, k, low, b = values.shape[0], self.k, self.low_bits, self.prob_bits
        # One sort of (id, position) keys: ~10x faster than argsort, and the ids come out sorted.
        position_bits = (k - 1).bit_length()
        keys = np.sort((index << position_bits) | np.arange(k), axis=1)
        index = keys >> position_bits
        values = np.take_along_axis(values, keys & ((1 << position_bits) - 1), axis=1)
        duplicate = np.flatnonzero((np.diff(index, axis=1) == 0).any(axis=1))
        if duplicate.size:
            raise ValueError(f"row {first_row + duplicate[0]}: ids must be distinct, got {index[duplicate[0]].tolist()}")
        codes = probability_codes(values, self.levels, self.power)
        mass = mass_codes(values)

        high_at, low_at, codes_at = self._layout()
        bits = np.zeros((rows, self.record_bytes * 8), dtype=np.uint8)
        _to_bits(mass[:, None], bits[:, :MASS_BITS], MASS_BITS)
        ones = (index >> low) + np.arange(k) + high_at + (np.arange(rows) * bits.shape[1])[:, None]
        bits.reshape(-1)[ones.reshape(-1)] = 1
        _to_bits(index & ((1 << low) - 1), bits[:, low_at:low_at + k * low], low)
        _to_bits(codes, bits[:, codes_at:codes_at + k * b], b)
        return np.packbits(bits, axis=1, bitorder="little")

    def decode(self, records: torch.Tensor | np.ndarray) -> DecodedTopK:
        """(..., R) uint8 records -> ``DecodedTopK``: (..., k) fp32 log-probs, descending, their
        int32 ids, and the (...) fp32 tail mass. ValueError naming the first bad row for bytes
        that no ``encode`` writes (a wrong count of ids, ids >= V, no top code)."""
        array = records.detach().cpu().numpy() if isinstance(records, torch.Tensor) else np.asarray(records)
        if array.dtype != np.uint8 or array.ndim < 1 or array.shape[-1] != self.record_bytes:
            raise ValueError(f"records must be uint8 (..., {self.record_bytes}), got {array.dtype} {tuple(array.shape)}")
        leading = array.shape[:-1]
        array = array.reshape(-1, self.record_bytes)
        logprobs = np.empty((array.shape[0], self.k), dtype=np.float32)
        ids = np.empty((array.shape[0], self.k), dtype=np.int32)
        tail = np.empty(array.shape[0], dtype=np.float32)
        for start in range(0, array.shape[0], CHUNK_ROWS):
            stop = start + CHUNK_ROWS
            logprobs[start:stop], ids[start:stop], tail[start:stop] = self._decode_rows(array[start:stop], start)
        return DecodedTopK(torch.from_numpy(logprobs).reshape(*leading, self.k),
                           torch.from_numpy(ids).reshape(*leading, self.k), torch.from_numpy(tail).reshape(leading))

    def _decode_rows(self, records: np.ndarray, first_row: int):
        rows, k, low, b = records.shape[0], self.k, self.low_bits, self.prob_bits
        high_at, low_at, codes_at = self._layout()
        bits = np.unpackbits(records, axis=1, bitorder="little")
        unary = bits[:, high_at:high_at + self.high_bits].astype(bool)
        counts = unary.sum(axis=1, dtype=np.int64)
        _first_bad(counts != k, first_row, lambda row: f"{counts[row]} ids where there must be {k}")
        ones = np.flatnonzero(unary).reshape(rows, k) - (np.arange(rows) * self.high_bits)[:, None]
        index = ((ones - np.arange(k)) << low) | _from_bits(bits[:, low_at:low_at + k * low], k, low)
        _first_bad((np.diff(index, axis=1) <= 0).any(axis=1) | (index[:, -1] >= self.vocab_size), first_row,
                   lambda row: f"ids {index[row].tolist()} are not distinct ids below {self.vocab_size}")
        codes = _from_bits(bits[:, codes_at:codes_at + k * b], k, b)
        _first_bad(codes.max(axis=1) != self.levels, first_row, lambda row: f"no probability code is the top's, {self.levels}")

        relative = (np.arange(self.levels + 1) / self.levels) ** (1.0 / self.power)
        with np.errstate(divide="ignore"):
            log_relative = np.log(relative)  # code 0 -> -inf
        log_s, log_t = mass_from_codes(records[:, 0].astype(np.int64) | (records[:, 1].astype(np.int64) << 8))
        log_norm = np.log(relative[codes].sum(axis=1)) - log_s
        # Descending codes, ties by position (= ascending id): one sort of (code, position) keys.
        position_bits = (k - 1).bit_length()
        keys = np.sort(((self.levels - codes) << position_bits) | np.arange(k), axis=1)
        order = keys & ((1 << position_bits) - 1)
        values = log_relative[self.levels - (keys >> position_bits)] - log_norm[:, None]
        return values, np.take_along_axis(index, order, axis=1), np.exp(log_t)


# One vectorised pass per bit position (a handful) beats building (N, k, width) index arrays.
def _to_bits(values: np.ndarray, out: np.ndarray, width: int) -> None:
    """Writes the bits of (N, m) values into the (N, m·width) bit matrix ``out``, value j's at
    columns [j·width, (j + 1)·width), least significant first."""
    values = values.astype(np.uint32)
    for bit in range(width):
        out[:, bit::width] = (values >> bit) & 1


def _from_bits(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of ``_to_bits``: an (N, count·width) bit matrix -> (N, count) int64 values."""
    values = np.zeros((bits.shape[0], count), dtype=np.int64)
    for bit in range(width):
        values |= bits[:, bit::width].astype(np.int64) << bit
    return values


def _first_bad(bad: np.ndarray, first_row: int, describe) -> None:
    rows = np.flatnonzero(bad)
    if rows.size:
        raise ValueError(f"record {first_row + rows[0]} is corrupt: {describe(rows[0])}"
                         + (f" ({rows.size} bad records in this chunk)" if rows.size > 1 else ""))


def probability_codes(values: np.ndarray, levels: int, power: float) -> np.ndarray:
    """(N, k) float64 log-probs -> int64 codes clamp(rint(M·(p / p_max)^γ), 1, M), 0 where p = 0."""
    top = values.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        companded = np.exp(power * (values - top))
    codes = np.clip(np.rint(levels * companded), 1, levels).astype(np.int64)
    return np.where(np.isneginf(values), 0, codes)


def mass_codes(values: np.ndarray) -> np.ndarray:
    """(N, k) float64 log-probs -> the 16-bit code of the logit of their mass S (65535: 1 − S <= 0).

    log S = top + log1p(Σ_{i ≠ top} p_i / p_top): 1 − S = −expm1(log S) then keeps the small
    tails of peaked rows that 1 − Σ p_i would round away."""
    rows = np.arange(values.shape[0])
    top_at = values.argmax(axis=1)
    top = values[rows, top_at]
    others = np.exp(values - top[:, None])
    others[rows, top_at] = 0.0
    log_mass = top + np.log1p(others.sum(axis=1))
    tail = -np.expm1(log_mass)
    with np.errstate(divide="ignore", invalid="ignore"):
        logit = log_mass - np.log(tail)
    codes = np.clip(np.rint((logit - MASS_LOGIT_RANGE[0]) / MASS_STEP), 0, MASS_ZERO_TAIL - 1)
    return np.where(tail > 0, codes, MASS_ZERO_TAIL).astype(np.int64)


def mass_from_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit mass codes -> (log S, log(1 − S)) as float64 (log(1 − S) = -inf for code 65535)."""
    logit = MASS_LOGIT_RANGE[0] + codes * MASS_STEP
    zero_tail = codes == MASS_ZERO_TAIL
    log_s = np.where(zero_tail, 0.0, -np.logaddexp(0.0, -logit))
    log_t = np.where(zero_tail, -np.inf, -np.logaddexp(0.0, logit))
    return log_s, log_t


# ------------------------------------------------------------------ reference
def encode_reference(codec: TopKCodec, logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The record format, one (k,) row at a time with Python ints: the definition ``encode``
    is tested against. (N, k) -> (N, R) uint8. (The mass code may differ from ``encode``'s by
    one step where the sums' rounding differs: it quantises a difference of nearby floats.)"""
    k, low, levels, gamma = codec.k, codec.low_bits, codec.levels, codec.power
    out = []
    for row_logprobs, row_ids in zip(logprobs.double(), ids.long()):
        order = torch.argsort(row_ids)
        row_ids, row_logprobs = row_ids[order].tolist(), row_logprobs[order].tolist()
        assert len(set(row_ids)) == k and 0 <= row_ids[0] and row_ids[-1] < codec.vocab_size
        top = max(row_logprobs)
        top_at = row_logprobs.index(top)
        log_mass = top + math.log1p(sum(math.exp(v - top) for i, v in enumerate(row_logprobs) if i != top_at))
        if log_mass >= 0.0:
            mass_code = MASS_ZERO_TAIL
        else:
            logit = log_mass - math.log(-math.expm1(log_mass))
            mass_code = min(max(round((logit - MASS_LOGIT_RANGE[0]) / MASS_STEP), 0), MASS_ZERO_TAIL - 1)
        record, position = mass_code, MASS_BITS
        for i, token in enumerate(row_ids):
            record |= 1 << (position + (token >> low) + i)
        position += codec.high_bits
        for token in row_ids:
            record |= (token & ((1 << low) - 1)) << position
            position += low
        for value in row_logprobs:
            code = 0 if value == -math.inf else min(max(round(levels * math.exp(gamma * (value - top))), 1), levels)
            record |= code << position
            position += codec.prob_bits
        out.append(list(record.to_bytes(codec.record_bytes, "little")))
    return torch.tensor(out, dtype=torch.uint8).reshape(-1, codec.record_bytes)


def decode_reference(codec: TopKCodec, records: torch.Tensor) -> DecodedTopK:
    """Inverse of ``encode_reference``, one record at a time: (N, R) uint8 -> ``DecodedTopK``."""
    k, low, levels = codec.k, codec.low_bits, codec.levels
    all_logprobs, all_ids, tails = [], [], []
    for row in records:
        record = int.from_bytes(bytes(row.tolist()), "little")
        mass_code = record & ((1 << MASS_BITS) - 1)
        high_part = record >> MASS_BITS
        ones = [bit for bit in range(codec.high_bits) if high_part >> bit & 1]
        position = MASS_BITS + codec.high_bits
        ids = []
        for i, one in enumerate(ones):
            ids.append(((one - i) << low) | (record >> (position + i * low) & ((1 << low) - 1)))
        position += k * low
        codes = [record >> (position + i * codec.prob_bits) & levels for i in range(k)]
        weights = torch.tensor([(code / levels) ** (1.0 / codec.power) for code in codes], dtype=torch.float64)
        if mass_code == MASS_ZERO_TAIL:
            mass, tail = 1.0, 0.0
        else:
            logit = torch.tensor(MASS_LOGIT_RANGE[0] + mass_code * MASS_STEP, dtype=torch.float64)
            mass, tail = torch.sigmoid(logit).item(), torch.sigmoid(-logit).item()
        probs = mass * weights / weights.sum()
        order = sorted(range(k), key=lambda i: (-codes[i], ids[i]))
        all_logprobs.append(probs.log()[order])
        all_ids.append(torch.tensor(ids)[order])
        tails.append(tail)
    return DecodedTopK(torch.stack(all_logprobs).float().reshape(-1, k),
                       torch.stack(all_ids).to(torch.int32).reshape(-1, k), torch.tensor(tails, dtype=torch.float32))
