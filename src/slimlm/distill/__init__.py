"""Distillation: the teacher's knowledge, cached or live, into the pruned student."""
from slimlm.distill.generate import SyntheticDataset, generate_synthetic, load_prompts, mix, prompts_from_texts
from slimlm.distill.mixture import SourceMixture, dynamic_mix_callback, reference_losses, update_weights
from slimlm.distill.prompts import general_prompts, mix_prompts, parse_sources
from slimlm.distill.sampler import Sample, sample
from slimlm.distill.topk_cache import (
    PackedTopKBlocks,
    TeacherTopKCache,
    cache_teacher_topk,
    load_teacher_topk,
    teacher_topk,
)
from slimlm.distill.trainer import DistillationConfig, DistillationTrainer, correct_teacher, topk_examples

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "PackedTopKBlocks",
    "Sample",
    "SourceMixture",
    "SyntheticDataset",
    "TeacherTopKCache",
    "cache_teacher_topk",
    "correct_teacher",
    "dynamic_mix_callback",
    "general_prompts",
    "generate_synthetic",
    "load_prompts",
    "load_teacher_topk",
    "mix",
    "mix_prompts",
    "parse_sources",
    "prompts_from_texts",
    "reference_losses",
    "sample",
    "teacher_topk",
    "topk_examples",
    "update_weights",
]
