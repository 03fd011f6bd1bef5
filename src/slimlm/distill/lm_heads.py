"""The LM heads distillation works through: the vocabulary student and teacher share, and a
frozen teacher's ``LMHead`` whole whatever shards it (FSDP1, FSDP2)."""
from __future__ import annotations

import transformers

from slimlm.architectures import LMHead, lm_head
from slimlm.errors import InputError


def check_vocabularies(student, teacher, student_tokenizer=None, teacher_tokenizer=None) -> int:
    """The vocabulary size both models share; padding-only differences are allowed (the
    extra rows are trimmed with a warning), a real tokenizer mismatch is an error."""
    student_vocab, teacher_vocab = vocab_rows(student), vocab_rows(teacher)
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise InputError(
                f"student and teacher tokenizers differ ({len(student_tokenizer)} vs {len(teacher_tokenizer)} tokens); "
                "distillation needs the same tokenizer"
            )
        real = len(student_tokenizer)
        for role, model, rows in (("student", student, student_vocab), ("teacher", teacher, teacher_vocab)):
            if rows < real:
                name = getattr(model, "name_or_path", None) or type(model).__name__
                raise InputError(f"the {role} {name}'s LM head has {rows} rows, fewer than the tokenizer's {real} "
                                 "tokens")
    if student_vocab != teacher_vocab:
        smaller, larger = sorted((student_vocab, teacher_vocab))
        # Checkpoints pad their embedding to a multiple of 64 or 128 rows (151936 vs 152064).
        if larger - smaller >= 1024 or (student_tokenizer is None and teacher_tokenizer is None and larger - smaller > 256):
            raise InputError(
                f"student vocabulary ({student_vocab}) and teacher vocabulary ({teacher_vocab}) differ by more "
                "than padding; distillation needs the same tokenizer"
            )
        transformers.logging.get_logger(__name__).warning(
            f"student LM head has {student_vocab} rows and the teacher's {teacher_vocab}: padding-only difference, "
            f"the loss uses the first {smaller}"
        )
    return min(student_vocab, teacher_vocab)


def vocab_rows(model) -> int:
    """Rows of the LM head, read from the module (its weight may be a flat FSDP shard)."""
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None) or getattr(head, "num_embeddings", None)
    return int(rows) if rows is not None else head.weight.shape[0]


def whole_lm_head(model) -> LMHead:
    """The ``LMHead`` of a frozen model with the weight and bias as whole, detached tensors,
    whatever shards them: an FSDP2 (``fully_shard``) DTensor is gathered, an FSDP1 root's flat
    shard is summoned (root unit only); both are then copied, as sharding reuses their storage.
    Unsharded models give references (no copy)."""
    head = lm_head(model)
    if head.weight.dim() == 2 and not is_dtensor(head.weight):
        return head.detached()
    if is_dtensor(head.weight):
        gather = lambda t: None if t is None else (t.full_tensor() if is_dtensor(t) else t).detach().clone()  # noqa: E731
        return LMHead(gather(head.weight), gather(head.bias), head.logit_scale, head.softcap)
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not isinstance(model, FullyShardedDataParallel):
        raise ValueError(
            f"{type(model).__name__}'s LM head weight has shape {tuple(head.weight.shape)}: it looks sharded, but not "
            "by FSDP; pass the teacher unsharded or wrapped by FullyShardedDataParallel / fully_shard"
        )
    with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
        head = lm_head(model)
        if head.weight.dim() != 2:
            raise ValueError("the teacher's LM head is not in its FSDP root unit; wrap only its decoder layers")
        detached = head.detached()
        return LMHead(detached.weight.clone(), None if detached.bias is None else detached.bias.clone(),
                      head.logit_scale, head.softcap)


def is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)
