"""Hidden-state (intermediate) distillation: cosine or MSE between mapped layers' hidden
states, with a learnable projection when the widths differ."""
from __future__ import annotations

import torch

from slimlm.losses.validation import check_matrix

HIDDEN_LOSS_KINDS = ("cosine", "mse")


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    kind: str = "cosine",
    projection: torch.nn.Module | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance between student and teacher hidden states (..., H_s) and (..., H_t), in fp32.

    With h = projection(student_hidden) (identity when None; needed when H_s != H_t) and
    t = teacher_hidden (no gradient): ``cosine`` = mean over tokens of 1 − cos(h, t);
    ``mse`` = mean over tokens and features of (h − t)². ``mask`` (leading shape, bool or
    0/1) keeps only the tokens that count (e.g. the attention mask); none counting gives 0.
    """
    if kind not in HIDDEN_LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSS_KINDS)}, got {kind!r}")
    check_matrix("student_hidden", student_hidden, 0)
    check_matrix("teacher_hidden", teacher_hidden, 0)
    if projection is not None:
        weight = getattr(projection, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype != student_hidden.dtype:
            student_hidden = student_hidden.to(weight.dtype)
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        hint = "" if projection is not None else " (pass a projection, e.g. HiddenStateProjection, when widths differ)"
        raise ValueError(
            f"student_hidden{' after projection' if projection is not None else ''} {tuple(student_hidden.shape)} "
            f"and teacher_hidden {tuple(teacher_hidden.shape)} must have the same shape{hint}"
        )
    student = student_hidden.float()
    teacher = teacher_hidden.detach().float()
    if kind == "cosine":
        per_token = 1.0 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        per_token = (student - teacher).square().mean(-1)
    if mask is None:
        return per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the hidden states' leading shape {tuple(per_token.shape)}")
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


class HiddenStateProjection(torch.nn.Linear):
    """Learnable student-width → teacher-width map for a hidden-state loss.

    Initialised to copy the student's channels onto the teacher channels they came from:
    ``kept_channels[i]`` is the teacher channel that student channel i kept after width
    pruning (default 0..H_s−1), so the loss starts from the pruned model's own alignment.
    """

    def __init__(self, student_width: int, teacher_width: int, kept_channels=None, dtype=None, device=None):
        super().__init__(student_width, teacher_width, bias=False, dtype=dtype, device=device)
        kept = torch.arange(min(student_width, teacher_width)) if kept_channels is None else torch.as_tensor(kept_channels)
        if kept.dim() != 1 or kept.numel() > student_width or (kept.numel() and (kept.min() < 0 or kept.max() >= teacher_width)):
            raise ValueError(
                f"kept_channels must be at most {student_width} teacher channel indices in [0, {teacher_width}), "
                f"got shape {tuple(kept.shape)}"
            )
        with torch.no_grad():
            self.weight.zero_()
            self.weight[kept.long(), torch.arange(kept.numel())] = 1.0


def depth_layer_map(num_student_layers: int, num_teacher_layers: int, kept_layers=None) -> dict[int, int]:
    """Student → teacher indices into Hugging Face ``hidden_states`` tuples (0: embeddings, i: after layer i).

    ``kept_layers``: the teacher layers (0-based) the depth-pruned student kept, in order;
    student layer i is teacher layer kept_layers[i], so their outputs align. Without it the
    student's layers are spread evenly over the teacher's (last onto last).
    """
    if kept_layers is not None:
        kept = list(kept_layers)
        if len(kept) != num_student_layers or sorted(set(kept)) != kept or (kept and (kept[0] < 0 or kept[-1] >= num_teacher_layers)):
            raise ValueError(
                f"kept_layers must be {num_student_layers} increasing teacher layer indices in [0, {num_teacher_layers}), got {kept}"
            )
        return {i + 1: layer + 1 for i, layer in enumerate(kept)}
    if not 0 < num_student_layers <= num_teacher_layers:
        raise ValueError(f"need 0 < student layers ({num_student_layers}) <= teacher layers ({num_teacher_layers})")
    return {i: round(i * num_teacher_layers / num_student_layers) for i in range(1, num_student_layers + 1)}


class HiddenStateDistiller(torch.nn.Module):
    """Hidden-state loss over mapped layers, with one learnable projection per layer when widths differ.

    ``layer_map`` maps student to teacher indices into the models' ``hidden_states`` tuples
    (``output_hidden_states=True``; see ``depth_layer_map``). The loss is the mean over mapped
    layers of ``hidden_state_loss``.
    """

    def __init__(self, student_width: int, teacher_width: int, layer_map: dict[int, int], *, kind: str = "cosine",
                 kept_channels=None, dtype=None, device=None):
        super().__init__()
        if kind not in HIDDEN_LOSS_KINDS:
            raise ValueError(f"kind must be one of {', '.join(HIDDEN_LOSS_KINDS)}, got {kind!r}")
        if not layer_map:
            raise ValueError("layer_map must map at least one student layer to a teacher layer")
        self.kind = kind
        self.layer_map = {int(k): int(v) for k, v in layer_map.items()}
        needs_projection = student_width != teacher_width or kept_channels is not None
        self.projections = torch.nn.ModuleDict(
            {
                str(student_layer): HiddenStateProjection(student_width, teacher_width, kept_channels, dtype, device)
                for student_layer in self.layer_map
            }
            if needs_projection
            else {}
        )

    def forward(self, student_hidden_states, teacher_hidden_states, mask: torch.Tensor | None = None) -> torch.Tensor:
        losses = []
        for student_layer, teacher_layer in self.layer_map.items():
            if student_layer >= len(student_hidden_states) or teacher_layer >= len(teacher_hidden_states):
                raise ValueError(
                    f"layer_map {student_layer} → {teacher_layer} is out of range: the student gave "
                    f"{len(student_hidden_states)} hidden states, the teacher {len(teacher_hidden_states)}"
                )
            projection = self.projections[str(student_layer)] if self.projections else None
            losses.append(hidden_state_loss(student_hidden_states[student_layer], teacher_hidden_states[teacher_layer],
                                             kind=self.kind, projection=projection, mask=mask))
        return torch.stack(losses).mean()
