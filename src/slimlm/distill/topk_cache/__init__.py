"""Offline sparse teacher: a causal LM's top-k log-probabilities per token, on disk, in fixed-size
records (``slimlm.distill.topk_codec``: 142 bytes/token at k = 64, V = 49152, against 512 for fp32
log-probs + int32 ids). ``cache_teacher_topk`` computes them with an in-process model;
``TopKCacheWriter`` writes rows computed elsewhere (a served teacher: ``slimlm.distill.served``)
into the same format, with the same manifest, resume and refusals — the former is built on it.

A cache folder holds ``manifest.json`` and, per part of consecutive sequences, three raw arrays:

- ``part-00000.topk``     uint8 (T, R)   token t's record at byte t·R (memory-mapped on read)
- ``part-00000.tokens``   uint16 or uint32 (T,), little-endian: the sequences' tokens
- ``part-00000.offsets``  int64 (S + 1,), little-endian: sequence s is tokens offsets[s]:offsets[s + 1]

The manifest: format, k, vocab size, temperature, the codec's parameters, record size, the
teacher's identity (``teacher_identity``), the tokenizer's (when given), the identity of the
token shards the parts are aligned with (``shards``, when given), and per part its token and
sequence counts and the SHA-256 digests of its files. Parts close after ``shard_tokens`` tokens
(at a sequence end), or exactly at the given per-part sizes, so that part i can line up with
token shard i.

Row t of a sequence is the teacher's distribution over the token at t + 1 (the logits at
position t, as Hugging Face computes them), so a loss pairs row t with the student's logits at
t. The last row is a real distribution too (over the token after the sequence): a loss over
one sequence ignores it (its label is -100), a block read across a sequence end (``blocks``)
pairs it with the next sequence's first token. Only JSON and raw arrays are read back, never
pickles.

Writing is resumable per part: a part is written under a staging name, renamed once complete,
then listed in the manifest (``"complete": false`` until the last one); a rerun with the same
arguments keeps the listed parts (after checking their sizes, digests and that the dataset
starts with the same sequences) and computes the rest. A listed file that is missing, truncated
or altered is an InputError naming it, and nothing is overwritten.
"""
from slimlm.distill.topk_cache.blocks import PackedTopKBlocks
from slimlm.distill.topk_cache.compute import cache_teacher_topk, teacher_topk
from slimlm.distill.topk_cache.format import (
    FILES,
    FORMAT,
    FORMAT_1_INDEX,
    MANIFEST,
    RUN_FIELDS,
    SUFFIXES,
    teacher_identity,
    tokenizer_identity,
)
from slimlm.distill.topk_cache.reader import TeacherTopKCache, load_teacher_topk
from slimlm.distill.topk_cache.writer import TopKCacheWriter, refuse_finished_cache, token_sequences

__all__ = [
    "FILES",
    "FORMAT",
    "FORMAT_1_INDEX",
    "MANIFEST",
    "PackedTopKBlocks",
    "RUN_FIELDS",
    "SUFFIXES",
    "TeacherTopKCache",
    "TopKCacheWriter",
    "cache_teacher_topk",
    "load_teacher_topk",
    "refuse_finished_cache",
    "teacher_identity",
    "teacher_topk",
    "token_sequences",
    "tokenizer_identity",
]
