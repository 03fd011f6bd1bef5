"""kl_div_fwd on every backend against the fp64 reference, and kl_div_loss's contract."""
import math

import pytest
import torch

from slimlm import _extension
from slimlm.kernels import dispatch
from conftest import available_backends, native_device
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


def on_device(fn, device, *args, **kwargs):
    """``fn`` on copies of the tensor arguments moved to ``device``; tensor results come back to the CPU."""
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    result = fn(*moved, **kwargs)
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


def fp64_truth(student, teacher, labels, temperature, beta, scale):
    return reference.kl_div_fwd(student.double(), teacher.double(), labels, -100, temperature, beta, scale, True)


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta,temperature", DIVERGENCES)
@pytest.mark.parametrize("rows,vocab", SHAPES)
def test_backend_matches_fp64_reference(backend, device, dtype, beta, temperature, rows, vocab):
    student = realistic_logits(rows, vocab, dtype, seed=rows * vocab)
    teacher = realistic_logits(rows, vocab, dtype, seed=rows * vocab + 1)
    labels = torch.arange(rows) * 3
    labels[::2] = -100
    scale = temperature**2
    loss64, grad64 = fp64_truth(student, teacher, labels, temperature, beta, scale)
    loss_t, grad_t = reference.kl_div_fwd(student, teacher, labels, -100, temperature, beta, scale, True)
    loss_b, grad_b = on_device(kl_ops.kl_div_fwd, device, student, teacher, labels, -100, temperature, beta, scale, True,
                               backend=backend)

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


@pytest.mark.parametrize("backend", available_backends(None))
def test_forward_only_returns_empty_grad(backend, device):
    student = realistic_logits(4, 300, torch.float32, 0)
    teacher = realistic_logits(4, 300, torch.float32, 1)
    loss, grad = on_device(kl_ops.kl_div_fwd, device, student, teacher, None, -100, 1.0, 0.0, 1.0, False, backend=backend)
    ref, _ = reference.kl_div_fwd(student, teacher, None, -100, 1.0, 0.0, 1.0, True)
    assert grad.numel() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_negative_infinity_logits(backend, device, beta):
    """A masked vocabulary (-inf logits) gives finite losses and gradients.

    Columns 500+ are masked on both sides; in row 1 one side alone is masked where the
    divergence stays finite (the teacher for forward KL and JSD, the student for reverse KL).
    """
    student = realistic_logits(3, 513, torch.float32, 2)
    teacher = realistic_logits(3, 513, torch.float32, 3)
    student[:, 500:] = float("-inf")
    teacher[:, 500:] = float("-inf")
    (student if beta == 1.0 else teacher)[1, :50] = float("-inf")
    loss, grad = on_device(kl_ops.kl_div_fwd, device, student, teacher, None, -100, 1.0, beta, 1.0, True, backend=backend)
    ref_loss, ref_grad = fp64_truth(student, teacher, None, 1.0, beta, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert torch.all(grad[:, 500:] == 0)


@pytest.mark.parametrize("backend", available_backends(None))
def test_all_rows_ignored_gives_zero_loss_and_grad(backend, device, monkeypatch):
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    student = torch.randn(2, 3, 77).to(device).requires_grad_()
    teacher = torch.randn(2, 3, 77).to(device)
    labels = torch.full((2, 3), -100).to(device)
    for reduction in ("batchmean", "mean", "sum"):
        loss = kl_div_loss(student, teacher, labels=labels, reduction=reduction)
        loss.backward()
        assert loss.item() == 0.0 and not math.isnan(loss.item())
        assert torch.all(student.grad == 0)
        student.grad = None


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_loss_and_grad_match_autograd_of_reference(backend, device, reduction, monkeypatch):
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    torch.manual_seed(0)
    student = torch.randn(2, 5, 301) * 4
    teacher = torch.randn(2, 5, 301) * 4
    labels = torch.randint(0, 301, (2, 5))
    labels[0, :3] = -100
    temperature, beta = 2.0, 0.5
    weights = torch.randn(2, 5) if reduction == "none" else torch.tensor(1.7)

    student_on_device = student.to(device).requires_grad_()
    loss = kl_div_loss(
        student_on_device, teacher.to(device), labels=labels.to(device), temperature=temperature, beta=beta,
        reduction=reduction,
    )
    (loss * weights.to(device)).sum().backward()

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
    torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student_on_device.grad.cpu(), leaf.grad, rtol=1e-4, atol=1e-6)


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


@pytest.mark.skipif(not _extension.has_op("kl_div_fwd"), reason="slimlm._C not built")
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


def assert_within_error_rule(loss, grad, student, teacher, labels, temperature, beta):
    """The rule of test_backend_matches_fp64_reference, for outputs on the CPU (scale 1)."""
    loss64, grad64 = fp64_truth(student, teacher, labels, temperature, beta, 1.0)
    loss_t, grad_t = reference.kl_div_fwd(student, teacher, labels, -100, temperature, beta, 1.0, True)
    assert max_err(loss, loss64) <= 2 * max_err(loss_t, loss64) + 1e-5 * (1 + loss64.abs().max().item())
    assert max_err(grad, grad64) <= 2 * max_err(grad_t, grad64) + 1e-6 * (1 + grad64.abs().max().item())


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_at_unaligned_addresses(backend, device, dtype):
    """Student, teacher and gradient rows need not share an alignment (views at odd offsets)."""
    vocab = 1003
    student_storage = realistic_logits(5, vocab, dtype, 6).to(device)
    teacher_storage = realistic_logits(6, vocab, dtype, 7).to(device)
    student, teacher = student_storage[1:4], teacher_storage[3:6]
    assert student.is_contiguous() and teacher.is_contiguous()
    labels = torch.tensor([1, -100, 2], device=device)
    for beta in (0.0, 0.5, 1.0):
        loss, grad = kl_ops.kl_div_fwd(student, teacher, labels, -100, 1.5, beta, 1.0, True, backend=backend)
        assert_within_error_rule(loss.cpu(), grad.cpu(), student.cpu(), teacher.cpu(), labels.cpu(), 1.5, beta)


def _triton_op():
    """The Triton backend's custom op, imported on demand (Triton is optional)."""
    if not dispatch.backends()["triton"]:
        pytest.skip("triton not installed / no GPU and not interpreted")
    from slimlm.kernels.triton import kl_div as triton_kl_div  # noqa: F401  (registers the op)

    return torch.ops.slimlm.kl_div_fwd_triton.default


def test_triton_opcheck():
    op = _triton_op()
    device = native_device("triton")
    student = realistic_logits(4, 129, torch.float32, 4).to(device)
    teacher = realistic_logits(4, 129, torch.float32, 5).to(device)
    labels = torch.tensor([1, -100, 3, 4], device=device)
    for args in [
        (student, teacher, labels, -100, 1.0, 0.0, 1.0, True),
        (student, teacher, None, -100, 2.0, 0.5, 4.0, False),
        (student.bfloat16(), teacher.bfloat16(), labels, -100, 1.0, 1.0, 1.0, True),
    ]:
        torch.library.opcheck(op, args)


def test_triton_compiles_fullgraph():
    """The Triton op traces through its fake implementation and runs the kernel when compiled."""
    _triton_op()
    device = native_device("triton")
    student = realistic_logits(6, 300, torch.float32, 8).to(device)
    teacher = realistic_logits(6, 300, torch.float32, 9).to(device)
    labels = torch.tensor([0, 1, -100, 3, 4, 5], device=device)

    def step(s, t, y):
        loss_rows, grad = kl_ops.kl_div_fwd(s, t, y, -100, 2.0, 0.5, 4.0, True, backend="triton")
        return loss_rows.sum(), grad * 2

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, grad = compiled(student, teacher, labels)
    expected_loss, expected_grad = step(student, teacher, labels)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


GPU_BACKENDS = [p for p in available_backends("cuda") if p.values[0] in ("cuda", "triton")]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "rows,vocab,dtype", [(16, 128256, torch.bfloat16), (8, 151936, torch.float32), (8, 50257, torch.float16)], ids=str
)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_llm_vocabularies_on_gpu(backend, rows, vocab, dtype, beta):
    """Real LLM vocabulary sizes (Llama 3, Qwen2, GPT-2's odd one) on the GPU kernels."""
    student = realistic_logits(rows, vocab, dtype, seed=vocab)
    teacher = realistic_logits(rows, vocab, dtype, seed=vocab + 1)
    labels = torch.arange(rows)
    labels[1::3] = -100
    loss, grad = on_device(kl_ops.kl_div_fwd, "cuda", student, teacher, labels, -100, 1.0, beta, 1.0, True,
                           backend=backend)
    assert_within_error_rule(loss, grad, student, teacher, labels, 1.0, beta)
    assert torch.all(grad[labels == -100] == 0)


# The C++ backend once per instruction-set variant this CPU can run.
CPU_VARIANTS = [param for param in available_backends("cpu") if param.values[0] == "cpu"]


@pytest.mark.parametrize("backend", CPU_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_rows_of_every_width(backend, dtype):
    """Each compiled variant of the CPU kernel follows the error rule on rows ending in a partial
    vector of every width, with masked (-inf) columns and ignored rows; a 16 MB gradient, written
    with non-temporal stores, equals the same rows computed alone."""
    for rows, vocab in [(1, 7), (2, 33), (3, 4097), (4, 2048)]:
        student = realistic_logits(rows, vocab, dtype, seed=vocab)
        teacher = realistic_logits(rows, vocab, dtype, seed=vocab + 1)
        if vocab > 20:
            student[:, -19:] = float("-inf")
            teacher[:, -19:] = float("-inf")
        labels = torch.arange(rows)
        labels[1::3] = -100
        for beta, temperature in [(0.0, 1.0), (0.5, 2.0), (1.0, 0.5)]:
            loss, grad = kl_ops.kl_div_fwd(student, teacher, labels, -100, temperature, beta, 1.0, True, backend="cpu")
            assert_within_error_rule(loss, grad, student, teacher, labels, temperature, beta)
            assert torch.all(grad[labels == -100] == 0) and torch.all(loss[labels == -100] == 0)
            if vocab > 20:
                assert torch.all(grad[:, -19:] == 0)

    vocab = 32768
    rows = (16 << 20) // (vocab * torch.tensor([], dtype=dtype).element_size())
    student = realistic_logits(rows, vocab, dtype, seed=rows)
    teacher = realistic_logits(rows, vocab, dtype, seed=rows + 1)
    labels = torch.arange(rows)
    labels[1::3] = -100
    for beta in (0.0, 0.5, 1.0):
        loss, grad = kl_ops.kl_div_fwd(student, teacher, labels, -100, 1.0, beta, 1.0, True, backend="cpu")
        loss_alone, grad_alone = kl_ops.kl_div_fwd(
            student[:4], teacher[:4], labels[:4], -100, 1.0, beta, 1.0, True, backend="cpu"
        )
        assert torch.equal(loss[:4], loss_alone) and torch.equal(grad[:4], grad_alone)
        assert torch.all(grad[labels == -100] == 0) and torch.all(loss[labels == -100] == 0)


NON_FINITE_CASES = {
    "nan-teacher": ("teacher", lambda row: row.__setitem__(5, float("nan"))),
    "inf-teacher": ("teacher", lambda row: row.__setitem__(7, float("inf"))),
    "all-neginf-teacher": ("teacher", lambda row: row.fill_(float("-inf"))),
    "nan-student": ("student", lambda row: row.__setitem__(3, float("nan"))),
    "inf-student": ("student", lambda row: row.__setitem__(0, float("inf"))),
    "all-neginf-student": ("student", lambda row: row.fill_(float("-inf"))),
}


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_non_finite_rows_agree_with_the_reference(backend, device, case, beta):
    """A row whose softmax is undefined (a NaN or +inf logit, or all -inf) is NaN in loss and
    gradient on every backend, as in the reference; the other rows are untouched, and an ignored
    row is never read (NaN there stays out of loss and gradient)."""
    side, spoil = NON_FINITE_CASES[case]
    student = realistic_logits(4, 67, torch.float32, 20)
    teacher = realistic_logits(4, 67, torch.float32, 21)
    spoil((student if side == "student" else teacher)[1])
    spoil((student if side == "student" else teacher)[2])
    labels = torch.tensor([0, 1, -100, 3])
    loss, grad = on_device(kl_ops.kl_div_fwd, device, student, teacher, labels, -100, 1.0, beta, 1.0, True,
                           backend=backend)
    ref_loss, ref_grad = reference.kl_div_fwd(student, teacher, labels, -100, 1.0, beta, 1.0, True)
    assert torch.isnan(ref_loss[1]) and torch.isnan(ref_grad[1]).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert loss[2] == 0 and torch.all(grad[2] == 0)


def test_fused_linear_loss_is_nan_on_a_non_finite_hidden_state():
    """An inf in the teacher's hidden state makes its logits' row undefined: NaN loss and gradient
    (it once came out as a finite 7.85)."""
    from slimlm import fused_linear_kl_div_loss

    gen = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(6, 16, generator=gen).requires_grad_()
    teacher_hidden = torch.randn(6, 16, generator=gen)
    teacher_hidden[2, 3] = float("inf")
    loss = fused_linear_kl_div_loss(student_hidden, torch.randn(50, 16, generator=gen), teacher_hidden,
                                    torch.randn(50, 16, generator=gen))
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(student_hidden.grad[2]).all()
