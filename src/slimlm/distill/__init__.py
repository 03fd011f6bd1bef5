"""Distillation: the teacher's knowledge, cached or live, into the pruned student."""
from slimlm.distill.generate import SyntheticDataset, generate_synthetic, load_prompts, mix, prompts_from_texts
from slimlm.distill.topk_cache import TeacherTopKCache, cache_teacher_topk, load_teacher_topk, teacher_topk
from slimlm.distill.trainer import DistillationConfig, DistillationTrainer, correct_teacher, topk_examples

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "SyntheticDataset",
    "TeacherTopKCache",
    "cache_teacher_topk",
    "correct_teacher",
    "generate_synthetic",
    "load_prompts",
    "load_teacher_topk",
    "mix",
    "prompts_from_texts",
    "teacher_topk",
    "topk_examples",
]
