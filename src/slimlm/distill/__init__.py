"""Distillation: the teacher's knowledge, cached or live, into the pruned student."""
from slimlm.distill.topk_cache import TeacherTopKCache, cache_teacher_topk, load_teacher_topk, teacher_topk

__all__ = ["TeacherTopKCache", "cache_teacher_topk", "load_teacher_topk", "teacher_topk"]
