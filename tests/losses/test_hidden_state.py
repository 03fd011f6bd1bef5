"""hidden_state_loss, the width projection, and the layer map of depth-pruned students."""
import pytest
import torch

from slimlm.losses import HiddenStateDistiller, HiddenStateProjection, depth_layer_map, hidden_state_loss


def test_cosine_and_mse_match_their_definitions():
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    teacher = torch.randn(2, 5, 8, generator=gen)
    cosine = hidden_state_loss(student, teacher, kind="cosine")
    expected = (1 - (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))).mean()
    torch.testing.assert_close(cosine, expected)
    torch.testing.assert_close(hidden_state_loss(student, teacher, kind="mse"), ((student - teacher) ** 2).mean())
    assert hidden_state_loss(teacher, teacher, kind="cosine").abs() < 1e-6
    cosine.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_mask_keeps_only_valid_tokens_and_teacher_gets_no_gradient():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(2, 4, 6, generator=gen)
    teacher = torch.randn(2, 4, 6, generator=gen, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    masked = hidden_state_loss(student, teacher, kind="mse", mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(masked, hidden_state_loss(student[keep], teacher[keep], kind="mse"))
    assert not masked.requires_grad
    assert hidden_state_loss(student, teacher, mask=torch.zeros(2, 4)).item() == 0.0


def test_projection_starts_from_the_kept_channels_and_learns():
    gen = torch.Generator().manual_seed(2)
    teacher = torch.randn(3, 7, 12, generator=gen)
    kept = torch.tensor([0, 2, 3, 5, 8, 9, 10, 11])
    projection = HiddenStateProjection(8, 12, kept_channels=kept)
    student = teacher[..., kept]
    out = projection(student)
    torch.testing.assert_close(out[..., kept], student)
    assert torch.all(out[..., [1, 4, 6, 7]] == 0)

    optimizer = torch.optim.SGD(projection.parameters(), lr=0.5)
    first = hidden_state_loss(student, teacher, kind="mse", projection=projection)
    for _ in range(20):
        optimizer.zero_grad()
        hidden_state_loss(student, teacher, kind="mse", projection=projection).backward()
        optimizer.step()
    assert hidden_state_loss(student, teacher, kind="mse", projection=projection) < first


def test_bf16_hidden_states_through_fp32_projection():
    projection = HiddenStateProjection(4, 6)
    loss = hidden_state_loss(torch.randn(5, 4).bfloat16(), torch.randn(5, 6).bfloat16(), projection=projection)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_depth_layer_map():
    assert depth_layer_map(2, 4, kept_layers=[0, 3]) == {1: 1, 2: 4}
    assert depth_layer_map(2, 4) == {1: 2, 2: 4}
    assert depth_layer_map(3, 3) == {1: 1, 2: 2, 3: 3}
    for bad in ([3, 1], [0, 4], [0]):
        with pytest.raises(ValueError, match="kept_layers"):
            depth_layer_map(2, 4, kept_layers=bad)
    with pytest.raises(ValueError, match="student layers"):
        depth_layer_map(5, 4)


def test_distiller_over_a_depth_and_width_pruned_student():
    """A student that kept teacher layers 0 and 2 at width 8 of 12, scored on HF-style hidden_states tuples."""
    gen = torch.Generator().manual_seed(3)
    teacher_states = tuple(torch.randn(2, 5, 12, generator=gen) for _ in range(4))  # embeddings + 3 layers
    kept = torch.arange(8)
    student_states = (teacher_states[0][..., kept], teacher_states[1][..., kept], teacher_states[3][..., kept])
    distiller = HiddenStateDistiller(8, 12, depth_layer_map(2, 3, kept_layers=[0, 2]), kind="mse", kept_channels=kept)
    assert set(distiller.projections) == {"1", "2"}
    loss = distiller(student_states, teacher_states)
    manual = torch.stack([
        hidden_state_loss(student_states[1], teacher_states[1], kind="mse", projection=distiller.projections["1"]),
        hidden_state_loss(student_states[2], teacher_states[3], kind="mse", projection=distiller.projections["2"]),
    ]).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert all(p.grad is not None for p in distiller.parameters())
    same_width = HiddenStateDistiller(12, 12, {1: 1})
    assert len(same_width.projections) == 0
    assert same_width(teacher_states, teacher_states).abs() < 1e-6


BAD = [
    (lambda: hidden_state_loss(torch.randn(2, 4), torch.randn(2, 6)), "pass a projection"),
    (lambda: hidden_state_loss(torch.randn(2, 4), torch.randn(2, 4), kind="l1"), "kind must be one of"),
    (lambda: hidden_state_loss(torch.randn(2, 4), torch.randn(2, 4), mask=torch.ones(3)), "mask"),
    (lambda: HiddenStateProjection(4, 6, kept_channels=[0, 6]), "kept_channels"),
    (lambda: HiddenStateDistiller(4, 6, {}), "layer_map"),
    (lambda: HiddenStateDistiller(4, 4, {5: 1})((torch.randn(1, 4),) * 2, (torch.randn(1, 4),) * 2), "out of range"),
]


@pytest.mark.parametrize("call,message", BAD)
def test_bad_input_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
