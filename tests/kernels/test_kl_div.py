"""kl_div_fwd on every backend against the fp64 reference, and kl_div_loss's contract."""
import math

import pytest
import torch

from conftest import available_backends
from slimlm import kl_div_loss
from slimlm.kernels import kl_div as kl_ops
from slimlm.kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (beta, temperature) pairs cover every divergence with every temperature across the grid.
DIVERGENCES = [(0.0, 1.0), (0.0, 2.0), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0), (1.0, 2.0)]
SHAPES = [(1, 7), (5, 1000), (3, 4097)]


def realistic_logits(rows, vocab, dtype, seed):
    """Logits at LLM scale: std ~30, with a tail of very unlikely tokens near -120."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 30.0
    tail = torch.rand(rows, vocab, generator=gen) < 0.2
    logits[tail] = -120.0 + torch.randn(int(tail.sum()), generator=gen)
    return logits.to(dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def fp64_truth(student, teacher, labels, temperature, beta, scale):
    return reference.kl_div_fwd(student.double(), teacher.double(), labels, -100, temperature, beta, scale, True)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta,temperature", DIVERGENCES)
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_backend_matches_fp64_reference(backend, dtype, beta, temperature, rows, vocab):
    student = realistic_logits(rows, vocab, dtype, seed=rows * vocab)
    teacher = realistic_logits(rows, vocab, dtype, seed=rows * vocab + 1)
    labels = torch.arange(rows) * 3
    labels[::2] = -100
    scale = temperature**2
    loss64, grad64 = fp64_truth(student, teacher, labels, temperature, beta, scale)
    loss_t, grad_t = reference.kl_div_fwd(student, teacher, labels, -100, temperature, beta, scale, True)
    loss_b, grad_b = kl_ops.kl_div_fwd(student, teacher, labels, -100, temperature, beta, scale, True, backend=backend)

    assert loss_b.dtype == torch.float32 and loss_b.shape == (rows,)
    assert grad_b.dtype == dtype and grad_b.shape == student.shape
    # The rule: a kernel's error against fp64 is at most ~2x plain torch's in the same dtype.
    loss_tol = 2 * max_err(loss_t, loss64) + 1e-5 * (1 + loss64.abs().max().item())
    grad_tol = 2 * max_err(grad_t, grad64) + 1e-6 * (1 + grad64.abs().max().item())
    assert max_err(loss_b, loss64) <= loss_tol
    assert max_err(grad_b, grad64) <= grad_tol
    ignored = labels == -100
    assert torch.all(loss_b[ignored] == 0)
    assert torch.all(grad_b[ignored] == 0)


@pytest.mark.parametrize("backend", available_backends())
def test_forward_only_returns_empty_grad(backend):
    student = realistic_logits(4, 300, torch.float32, 0)
    teacher = realistic_logits(4, 300, torch.float32, 1)
    loss, grad = kl_ops.kl_div_fwd(student, teacher, None, -100, 1.0, 0.0, 1.0, False, backend=backend)
    ref, _ = reference.kl_div_fwd(student, teacher, None, -100, 1.0, 0.0, 1.0, True)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_negative_infinity_logits(backend, beta):
    """A masked vocabulary (-inf logits) gives finite losses and gradients.

    Columns 500+ are masked on both sides; in row 1 one side alone is masked where the
    divergence stays finite (the teacher for forward KL and JSD, the student for reverse KL).
    """
    student = realistic_logits(3, 513, torch.float32, 2)
    teacher = realistic_logits(3, 513, torch.float32, 3)
    student[:, 500:] = float("-inf")
    teacher[:, 500:] = float("-inf")
    (student if beta == 1.0 else teacher)[1, :50] = float("-inf")
    loss, grad = kl_ops.kl_div_fwd(student, teacher, None, -100, 1.0, beta, 1.0, True, backend=backend)
    ref_loss, ref_grad = fp64_truth(student, teacher, None, 1.0, beta, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert torch.all(grad[:, 500:] == 0)


@pytest.mark.parametrize("backend", available_backends())
def test_all_rows_ignored_gives_zero_loss_and_grad(backend, monkeypatch):
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    student = torch.randn(2, 3, 77, requires_grad=True)
    teacher = torch.randn(2, 3, 77)
    labels = torch.full((2, 3), -100)
    for reduction in ("batchmean", "mean", "sum"):
        loss = kl_div_loss(student, teacher, labels=labels, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and not math.isnan(loss.item())
        assert torch.all(student.grad == 0)
        student.grad = None


@pytest.mark.parametrize("backend", available_backends())
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_loss_and_grad_match_autograd_of_reference(backend, reduction, monkeypatch):
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 301) * 4).requires_grad_()
    teacher = torch.randn(2, 5, 301) * 4
    labels = torch.randint(0, 301, (2, 5))
    labels[0, :3] = -100
    temperature, beta = 2.0, 0.5

    loss = kl_div_loss(student, teacher, labels=labels, temperature=temperature, beta=beta, reduction=reduction)
    weights = torch.randn(2, 5) if reduction == "none" else torch.tensor(1.7)
    (loss * weights).sum().backward()

    leaf = student.detach().clone().requires_grad_()
    rows = reference.divergence_rows(leaf, teacher, temperature, beta) * temperature**2
    rows = torch.where(labels != -100, rows, torch.zeros_like(rows))
    valid = (labels != -100).sum()
    expected = {
        "batchmean": rows.sum() / valid,
        "sum": rows.sum(),
        "mean": rows.sum() / (valid * 301),
        "none": rows,
    }[reduction]
    (expected * weights).sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_num_items_in_batch_makes_accumulation_match_one_batch():
    """Two micro-batches divided by the global count sum to the loss of the whole batch."""
    torch.manual_seed(1)
    student = torch.randn(8, 50)
    teacher = torch.randn(8, 50)
    labels = torch.randint(0, 50, (8,))
    labels[[1, 2, 6]] = -100
    whole = kl_div_loss(student, teacher, labels=labels)
    total = int((labels != -100).sum())
    parts = sum(
        kl_div_loss(student[s], teacher[s], labels=labels[s], num_items_in_batch=total) for s in (slice(0, 3), slice(3, 8))
    )
    torch.testing.assert_close(parts, whole)


def test_temperature_convention():
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 20), torch.randn(4, 20)
    scaled = kl_div_loss(student, teacher, temperature=2.0)
    plain = kl_div_loss(student, teacher, temperature=2.0, scale_by_temperature_sq=False)
    torch.testing.assert_close(scaled, 4.0 * plain)
    assert kl_div_loss(student, teacher, temperature=2.0) != kl_div_loss(student, teacher, temperature=1.0)


def test_reference_matches_fp64_autograd_and_gradcheck():
    torch.manual_seed(3)
    student = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 11, dtype=torch.float64)
    for beta in (0.0, 0.3, 1.0):
        assert torch.autograd.gradcheck(lambda s: reference.divergence_rows(s, teacher, 1.5, beta), (student,))
    p, q = teacher.softmax(-1), student.detach().softmax(-1)
    torch.testing.assert_close(reference.divergence_rows(student, teacher).detach(), (p * (p.log() - q.log())).sum(-1))
    m = 0.3 * p + 0.7 * q
    jsd = 0.3 * (p * (p / m).log()).sum(-1) + 0.7 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(reference.divergence_rows(student, teacher, beta=0.3).detach(), jsd)


def test_backward_twice_is_an_error():
    student = torch.randn(2, 9, requires_grad=True)
    loss = kl_div_loss(student, torch.randn(2, 9))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.skipif(not kl_ops._extension.has_op("kl_div_fwd"), reason="slimlm._C not built")
def test_opcheck_registered_op():
    student = realistic_logits(4, 129, torch.float32, 4)
    teacher = realistic_logits(4, 129, torch.float32, 5)
    labels = torch.tensor([1, -100, 3, 4])
    for args in [
        (student, teacher, labels, -100, 1.0, 0.0, 1.0, True),
        (student, teacher, None, -100, 2.0, 0.5, 4.0, False),
        (student.bfloat16(), teacher.bfloat16(), labels, -100, 1.0, 1.0, 1.0, True),
    ]:
        torch.library.opcheck(torch.ops.slimlm.kl_div_fwd.default, args)


def test_compiles_fullgraph():
    student = torch.randn(6, 64, requires_grad=True)
    teacher = torch.randn(6, 64)
    labels = torch.tensor([0, 1, -100, 3, 4, 5])

    def step(s, t, y):
        return kl_div_loss(s, t, labels=y, beta=0.5, temperature=2.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher, labels)
    loss.backward()
    grad = student.grad.clone()
    student.grad = None
    step(student, teacher, labels).backward()
    torch.testing.assert_close(loss, step(student.detach(), teacher, labels))
    torch.testing.assert_close(grad, student.grad)


BAD_INPUTS = [
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 6)), "vocabulary sizes differ"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(3, 5)), "must have the same shape"),
    (dict(student_logits=torch.ones(2, 5, dtype=torch.long), teacher_logits=torch.randn(2, 5)), "student_logits must be float32"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.ones(2, 5, dtype=torch.int32)), "teacher_logits must be float32"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), labels=torch.zeros(3, dtype=torch.long)), "leading shape"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), labels=torch.zeros(2)), "integer tensor"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), temperature=0.0), "temperature"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), temperature=-1.0), "temperature"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), beta=1.5), "beta must be in"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), beta=-0.1), "beta must be in"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), reduction="avg"), "reduction must be one of"),
    (dict(student_logits=torch.randn(2, 5), teacher_logits=torch.randn(2, 5), num_items_in_batch=0), "num_items_in_batch"),
    (dict(student_logits=torch.randn(2, 0), teacher_logits=torch.randn(2, 0)), "empty vocabulary"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kl_div_loss(**kwargs)
