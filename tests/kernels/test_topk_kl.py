"""topk_kl_fwd on every backend against the fp64 reference, and topk_kl_div_loss's contract."""
import pytest
import torch

from slimlm import _extension
from conftest import available_backends
from slimlm.kernels import reference
from slimlm.kernels import topk_kl as topk_ops
from slimlm.losses import topk_kl_div_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (tail, beta, temperature): every divergence of the bucket tail, and the renormalised forward KL.
MODES = [("bucket", 0.0, 1.0), ("bucket", 0.0, 2.0), ("bucket", 0.5, 1.0), ("bucket", 1.0, 0.5), ("renormalize", 0.0, 2.0)]
SHAPES = [(1, 7, 3), (5, 1000, 16), (3, 4097, 64)]


def sparse_teacher(rows, vocab, k, temperature, seed, sharp=False):
    """A teacher's top-k log-probs at τ; ``sharp`` puts nearly all mass in the top-k (tiny tail)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * (30.0 if sharp else 4.0)
    top = torch.log_softmax(logits / temperature, -1).topk(k, -1)
    return top.values.contiguous(), top.indices.contiguous()


def student_logits(rows, vocab, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * 4.0).to(dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run(backend, device, student, logprobs, indices, labels, temperature, beta, scale, renormalize, compute_grad=True):
    """The op on copies of the tensors on ``device``; results come back to the CPU."""
    move = (lambda t: t.to(device) if t is not None else None)
    loss, grad = topk_ops.topk_kl_fwd(move(student), move(logprobs), move(indices), move(labels), -100, temperature,
                                      beta, scale, renormalize, compute_grad, backend=backend)
    return loss.cpu(), grad.cpu()


# Each backend on its native device (CUDA for cuda, and for triton when a GPU exists).
BACKENDS = available_backends(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail,beta,temperature", MODES)
@pytest.mark.parametrize("rows,vocab,k", SHAPES)
def test_backend_matches_fp64_reference(backend, device, dtype, tail, beta, temperature, rows, vocab, k):
    student = student_logits(rows, vocab, dtype, seed=rows * vocab)
    logprobs, indices = sparse_teacher(rows, vocab, k, temperature, seed=rows * vocab + 1, sharp=rows == 5)
    labels = torch.arange(rows) * 3
    labels[1::2] = -100
    renormalize = tail == "renormalize"
    scale = temperature**2
    args = (logprobs, indices, labels, -100, temperature, beta, scale, renormalize, True)
    loss64, grad64 = reference.topk_kl_fwd(student.double(), *args)
    loss_t, grad_t = reference.topk_kl_fwd(student, *args)
    loss_b, grad_b = run(backend, device, student, logprobs, indices, labels, temperature, beta, scale, renormalize)

    assert loss_b.dtype == torch.float32 and loss_b.shape == (rows,)
    assert grad_b.dtype == dtype and grad_b.shape == student.shape
    # The rule: a kernel's error against fp64 is at most ~2x plain torch's in the same dtype.
    assert max_err(loss_b, loss64) <= 2 * max_err(loss_t, loss64) + 1e-5 * (1 + loss64.abs().max().item())
    assert max_err(grad_b, grad64) <= 2 * max_err(grad_t, grad64) + 1e-6 * (1 + grad64.abs().max().item())
    ignored = labels == -100
    assert torch.all(loss_b[ignored] == 0) and torch.all(grad_b[ignored] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_and_masked_vocabulary(backend, device):
    """No gradient asked: empty grad. Student logits at -inf outside the teacher's support stay finite."""
    student = student_logits(4, 301, torch.float32, 0)
    logprobs, indices = sparse_teacher(4, 301, 8, 1.0, 1)
    outside = torch.ones(4, 301, dtype=torch.bool)
    outside.scatter_(1, indices, False)
    outside[:, :150] = False
    student[outside] = float("-inf")
    loss, grad = run(backend, device, student, logprobs, indices, None, 1.0, 0.0, 1.0, False, compute_grad=False)
    assert grad.numel() == 0
    ref_loss, ref_grad = reference.topk_kl_fwd(student.double(), logprobs, indices, None, -100, 1.0, 0.0, 1.0, False, True)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-5)
    loss, grad = run(backend, device, student, logprobs, indices, None, 1.0, 0.0, 1.0, False)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.all(grad[outside] == 0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_k_bucket_equals_dense_kl(backend, device, monkeypatch):
    """With k = V the tail is empty and the sparse loss is the dense one, for every divergence."""
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    gen = torch.Generator().manual_seed(5)
    student = (torch.randn(6, 37, generator=gen) * 3).to(device).requires_grad_()
    teacher = (torch.randn(6, 37, generator=gen) * 3).to(device)
    for beta in (0.0, 0.5, 1.0):
        top = torch.log_softmax(teacher / 2.0, -1).topk(37, -1)
        sparse = topk_kl_div_loss(student, top.values, top.indices, temperature=2.0, beta=beta)
        (grad_sparse,) = torch.autograd.grad(sparse, student)
        dense = (reference.divergence_rows(student, teacher, 2.0, beta) * 4.0).mean()
        (grad_dense,) = torch.autograd.grad(dense, student)
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_loss_matches_autograd_of_reference(backend, device, reduction, tail, monkeypatch):
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    torch.manual_seed(0)
    student = (torch.randn(2, 5, 301) * 4).to(device).requires_grad_()
    logprobs, indices = sparse_teacher(10, 301, 12, 2.0, 3)
    logprobs, indices = logprobs.reshape(2, 5, 12).to(device), indices.reshape(2, 5, 12).to(device)
    labels = torch.randint(0, 301, (2, 5))
    labels[0, :3] = -100
    labels = labels.to(device)
    beta = 0.0 if tail == "renormalize" else 0.5
    loss = topk_kl_div_loss(student, logprobs, indices, tail=tail, labels=labels, temperature=2.0, beta=beta,
                            reduction=reduction)
    weights = (torch.randn(2, 5) if reduction == "none" else torch.tensor(1.7)).to(device)
    (loss * weights).sum().backward()

    leaf = student.detach().clone().requires_grad_()
    log_p, log_q = reference.topk_bucket_logprobs(leaf.reshape(10, 301), logprobs.reshape(10, 12),
                                                  indices.reshape(10, 12), 2.0, tail == "renormalize")
    rows = (reference.divergence_from_logprobs(log_p, log_q, beta) * 4.0).reshape(2, 5)
    rows = torch.where(labels != -100, rows, torch.zeros_like(rows))
    valid = (labels != -100).sum()
    expected = {"batchmean": rows.sum() / valid, "sum": rows.sum(), "mean": rows.sum() / (valid * 301), "none": rows}[reduction]
    (expected * weights).sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student.grad, leaf.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_variant_matches_logits_variant(backend, device, dtype, monkeypatch):
    """Hidden states + weight (+ bias, CE, soft-cap) give the loss and gradients of the eager logits."""
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 9, 24, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(203, 24, generator=gen) * 0.2).to(dtype).to(device).requires_grad_()
    bias = (torch.randn(203, generator=gen) * 0.1).to(dtype).to(device).requires_grad_()
    logprobs, indices = sparse_teacher(18, 203, 16, 1.0, 8)
    logprobs, indices = logprobs.reshape(2, 9, 16).to(device), indices.reshape(2, 9, 16).to(device)
    labels = torch.randint(0, 203, (2, 9), generator=gen)
    labels[1, 4:] = -100
    labels = labels.to(device)
    fused = topk_kl_div_loss(hidden, logprobs, indices, student_weight=weight, student_bias=bias, labels=labels,
                             ce_weight=0.5, student_softcap=3.0, chunk_size=5)
    grads = torch.autograd.grad(fused, (hidden, weight, bias))

    leaves = [t.detach().float().requires_grad_() for t in (hidden, weight, bias)]
    logits = 3.0 * torch.tanh((leaves[0] @ leaves[1].T + leaves[2]) / 3.0)
    eager = topk_kl_div_loss(logits, logprobs, indices, labels=labels, backend="torch")
    eager = eager + 0.5 * torch.nn.functional.cross_entropy(logits.reshape(-1, 203), labels.reshape(-1))
    expected = torch.autograd.grad(eager, leaves)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(fused, eager.detach(), **tol)
    for got, want in zip(grads, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.skipif(not _extension.has_op("topk_kl_fwd"), reason="slimlm._C not built")
def test_opcheck_registered_op():
    student = student_logits(4, 129, torch.float32, 4)
    logprobs, indices = sparse_teacher(4, 129, 8, 1.0, 5)
    labels = torch.tensor([1, -100, 3, 4])
    for args in [
        (student, logprobs, indices, labels, -100, 1.0, 0.0, 1.0, False, True),
        (student, logprobs, indices, None, -100, 2.0, 0.5, 4.0, False, False),
        (student.bfloat16(), logprobs, indices, labels, -100, 1.0, 0.0, 1.0, True, True),
    ]:
        torch.library.opcheck(torch.ops.slimlm.topk_kl_fwd.default, args)


# The torch reference computes its gradient with autograd.grad, which Dynamo does not trace.
COMPILED_BACKENDS = [p for p in BACKENDS if p.values[0] != "torch"]


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_compiles_fullgraph(backend, device):
    """The loss traces through the op's fake implementation (no index check inside the graph)."""
    student = torch.randn(6, 64, device=device, requires_grad=True)
    logprobs, indices = sparse_teacher(6, 64, 8, 1.0, 6)
    logprobs, indices = logprobs.to(device), indices.to(device)
    labels = torch.tensor([0, 1, -100, 3, 4, 5], device=device)

    def step(s):
        return topk_kl_div_loss(s, logprobs, indices, labels=labels, temperature=2.0, beta=0.5, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(student)
    loss.backward()
    grad = student.grad.clone()
    student.grad = None
    expected = step(student)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, student.grad)


LOGPROBS, INDICES = sparse_teacher(2, 5, 3, 1.0, 9)
BAD_INPUTS = [
    (dict(teacher_topk_indices=INDICES + 5), r"\[0, 5\) for a student vocabulary of 5, got indices in \[\d+, \d+\]"),
    (dict(teacher_topk_indices=INDICES - 5), r"must lie in \[0, 5\)"),
    (dict(teacher_topk_indices=INDICES.float()), "integer tensor"),
    (dict(teacher_topk_logprobs=LOGPROBS[:, :2]), "must have the same shape"),
    (dict(student=torch.randn(3, 5)), r"the student's leading shape"),
    (dict(tail="drop"), "tail must be one of"),
    (dict(tail="renormalize", beta=0.5), "beta must be 0"),
    (dict(student_bias=torch.zeros(5)), "fused form"),
    (dict(temperature=0.0), "temperature"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    args = dict(student=torch.randn(2, 5), teacher_topk_logprobs=LOGPROBS, teacher_topk_indices=INDICES)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        topk_kl_div_loss(args.pop("student"), args.pop("teacher_topk_logprobs"), args.pop("teacher_topk_indices"), **args)


def test_fused_vocab_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"\[0, 7\) for a student vocabulary of 7"):
        topk_kl_div_loss(torch.randn(2, 4), torch.zeros(2, 3), torch.tensor([[0, 1, 9], [2, 3, 4]]),
                         student_weight=torch.randn(7, 4))


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_kernel_guards_out_of_range_indices(backend, device):
    """Below the Python check (as inside torch.compile) a bad index is never followed: an error or a NaN row."""
    student = student_logits(2, 50, torch.float32, 12)
    logprobs, indices = sparse_teacher(2, 50, 4, 1.0, 13)
    indices[1, 2] = 50
    try:
        loss, _ = run(backend, device, student, logprobs, indices, None, 1.0, 0.0, 1.0, False)
    except RuntimeError as error:
        assert "outside [0, 50)" in str(error)
    else:
        assert torch.isnan(loss[1]) and torch.isfinite(loss[0])


NON_FINITE_CASES = {
    "nan-student": lambda student, logprobs: student.__setitem__((1, 3), float("nan")),
    "inf-student": lambda student, logprobs: student.__setitem__((1, 0), float("inf")),
    "all-neginf-student": lambda student, logprobs: student[1].fill_(float("-inf")),
    "nan-teacher": lambda student, logprobs: logprobs.__setitem__((1, 2), float("nan")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(NON_FINITE_CASES))
@pytest.mark.parametrize("tail,beta", [("bucket", 0.0), ("bucket", 0.5), ("bucket", 1.0), ("renormalize", 0.0)])
def test_non_finite_rows_agree_with_the_reference(backend, device, case, tail, beta):
    """An undefined student softmax or a NaN teacher log-prob makes the row NaN (loss and gradient)
    on every backend, as in the reference; other rows are untouched; an ignored row is never read."""
    student = student_logits(4, 67, torch.float32, 30)
    logprobs, indices = sparse_teacher(4, 67, 5, 1.0, 31)
    spoil = NON_FINITE_CASES[case]
    spoil(student, logprobs)
    spoil(student[1:], logprobs[1:])  # row 2 too, which is ignored
    labels = torch.tensor([0, 1, -100, 3])
    args = (labels, 1.0, beta, 1.0, tail == "renormalize")
    loss, grad = run(backend, device, student, logprobs, indices, *args)
    ref_loss, ref_grad = reference.topk_kl_fwd(student, logprobs, indices, labels, -100, 1.0, beta, 1.0,
                                               tail == "renormalize", True)
    assert torch.isnan(ref_loss[1]) and torch.isnan(ref_grad[1]).all()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert loss[2] == 0 and torch.all(grad[2] == 0)
