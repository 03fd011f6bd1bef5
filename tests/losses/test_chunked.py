"""The chunked LM-head base through fused_linear_kl_div_loss on every backend against eager matmul → full
logits → reference loss."""
import pytest
import torch
import torch.nn.functional as F

from conftest import available_backends
from slimlm.kernels import reference
from slimlm.losses import chunked
from slimlm.losses import (
    FusedLinearKLDivLoss, causal_lm_kl_div_loss, fused_linear_kl_div_loss, lm_head_spec, topk_kl_div_loss,
)


def _kl_kernel_missing(backend):
    # The per-chunk step is kl_div_fwd; its C++ CPU kernel may not be registered in this build yet.
    return backend == "cpu" and not torch._C._dispatch_has_kernel_for_dispatch_key("slimlm::kl_div_fwd", "CPU")


@pytest.fixture
def backend_env(backend, monkeypatch):
    if _kl_kernel_missing(backend):
        pytest.skip("slimlm::kl_div_fwd has no CPU kernel in this build")
    monkeypatch.setenv("SLIMLM_BACKEND", backend)
    return backend


# Each backend on its native device (CUDA for cuda, and for triton when a GPU exists).
BACKENDS = available_backends(None)


def make_problem(rows=13, student_width=16, teacher_width=24, vocab=211, dtype=torch.float32, bias=True, seed=0,
                 device="cpu"):
    """Student and teacher heads at LLM-like logit scale (std ≈ 4), odd vocabulary, a third of rows ignored."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "student_hidden": torch.randn(rows, student_width, generator=gen),
        "student_weight": torch.randn(vocab, student_width, generator=gen) / student_width**0.5 * 4,
        "teacher_hidden": torch.randn(rows, teacher_width, generator=gen),
        "teacher_weight": torch.randn(vocab, teacher_width, generator=gen) / teacher_width**0.5 * 4,
    }
    if bias:
        tensors["student_bias"] = torch.randn(vocab, generator=gen)
        tensors["teacher_bias"] = torch.randn(vocab, generator=gen)
    tensors = {name: value.to(dtype).to(device) for name, value in tensors.items()}
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::3] = -100
    return tensors, labels.to(device)


def eager_loss(tensors, labels, *, temperature=1.0, beta=0.0, reduction="batchmean", ce_weight=0.0, kd_weight=1.0,
               softcap=None, logit_scale=1.0, num_items_in_batch=None):
    """The unfused definition in fp64: two matmuls → full logits → reference divergence (+ CE)."""
    leaves = {name: value.detach().cpu().double().requires_grad_(name.startswith("student")) for name, value in tensors.items()}
    labels = labels.cpu()

    def logits(side, scale):
        z = leaves[f"{side}_hidden"] @ leaves[f"{side}_weight"].T
        if f"{side}_bias" in leaves:
            z = z + leaves[f"{side}_bias"]
        z = z * scale
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    student, teacher = logits("student", logit_scale), logits("teacher", 1.0)
    valid = labels != -100
    kd = torch.where(valid, reference.divergence_rows(student, teacher, temperature, beta) * temperature**2, 0.0)
    ce = torch.where(valid, F.cross_entropy(student, labels.clamp(min=0), reduction="none"), 0.0)
    count = num_items_in_batch if num_items_in_batch is not None else valid.sum()
    vocab = student.shape[-1]
    rows = kd_weight * kd + ce_weight * ce
    loss = {
        "batchmean": rows.sum() / count,
        "mean": (kd_weight * kd.sum() / vocab + ce_weight * ce.sum()) / count,
        "sum": rows.sum(),
        "none": rows,
    }[reduction]
    return loss, leaves


def check(tensors, labels, loss, eager, leaves, weights, dtype):
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(loss.cpu().double(), eager.detach(), **tol)
    grads = torch.autograd.grad((loss * weights).sum(), [t for n, t in tensors.items() if n.startswith("student")])
    wanted = torch.autograd.grad((eager * weights.cpu().double()).sum(), [t for n, t in leaves.items() if n.startswith("student")])
    for got, want in zip(grads, wanted):
        assert got.dtype == dtype
        scale = want.abs().max().item()
        torch.testing.assert_close(got.cpu().double(), want, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 0.5)])
def test_matches_eager_with_bias_and_wider_teacher(backend_env, device, dtype, beta, temperature):
    tensors, labels = make_problem(dtype=dtype, seed=int(beta * 10 + temperature), device=device)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    loss = fused_linear_kl_div_loss(**tensors, labels=labels, temperature=temperature, beta=beta, chunk_size=4)
    eager, leaves = eager_loss(tensors, labels, temperature=temperature, beta=beta)
    check(tensors, labels, loss, eager, leaves, torch.tensor(1.0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_reductions_ce_softcap_and_scale(backend_env, device, reduction):
    tensors, labels = make_problem(rows=11, vocab=97, seed=3, device=device)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    options = dict(temperature=2.0, beta=0.3, ce_weight=0.4, kd_weight=0.6)
    loss = fused_linear_kl_div_loss(**tensors, labels=labels, reduction=reduction, chunk_size=3, student_softcap=5.0,
                                    teacher_softcap=5.0, student_logit_scale=0.8, **options)
    eager, leaves = eager_loss(tensors, labels, reduction=reduction, softcap=5.0, logit_scale=0.8, **options)
    weights = torch.randn(11, generator=torch.Generator().manual_seed(4)) if reduction == "none" else torch.tensor(1.3)
    weights = weights.to(device)
    assert loss.shape == eager.shape
    check(tensors, labels, loss, eager, leaves, weights, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weights_without_bias(backend_env, device):
    """The student's head is its input embedding: the gradient reaches it through both uses."""
    gen = torch.Generator().manual_seed(5)
    embedding = torch.nn.Embedding(101, 16).to(device)
    tokens = torch.randint(0, 101, (2, 7), generator=gen).to(device)
    teacher_hidden = torch.randn(2, 7, 20, generator=gen).to(device)
    teacher_weight = torch.randn(101, 20, generator=gen).to(device)
    labels = torch.randint(0, 101, (2, 7), generator=gen)
    labels[0, :2] = -100
    labels = labels.to(device)

    hidden = torch.tanh(embedding(tokens))
    fused_linear_kl_div_loss(hidden, embedding.weight, teacher_hidden, teacher_weight, labels=labels,
                             ce_weight=0.5, chunk_size=5).backward()
    fused_grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    hidden = torch.tanh(embedding(tokens))
    logits = hidden @ embedding.weight.T
    valid = labels != -100
    kd = torch.where(valid, reference.divergence_rows(logits, teacher_hidden @ teacher_weight.T), 0.0).sum() / valid.sum()
    (kd + 0.5 * F.cross_entropy(logits.reshape(-1, 101), labels.reshape(-1))).backward()
    torch.testing.assert_close(fused_grad, embedding.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropping_ignored_rows_changes_nothing_and_all_ignored_is_zero(backend_env, device):
    tensors, labels = make_problem(rows=10, vocab=67, seed=6, device=device)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    student = [t for n, t in tensors.items() if n.startswith("student")]
    results = []
    for drop in (True, False):
        loss = fused_linear_kl_div_loss(**tensors, labels=labels, drop_ignored_rows=drop, chunk_size=4)
        results.append((loss, torch.autograd.grad(loss, student)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
    assert torch.all(results[0][1][0][labels == -100] == 0)
    for reduction in ("batchmean", "mean", "sum"):
        loss = fused_linear_kl_div_loss(**tensors, labels=torch.full_like(labels, -100), reduction=reduction, ce_weight=1.0)
        grads = torch.autograd.grad(loss, student)
        assert loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)


def test_bf16_logits_are_not_rounded_before_the_softmax():
    """bf16 inputs: the gradient matches the fp32-logit computation far closer than bf16 rounding would allow."""
    tensors, labels = make_problem(rows=32, vocab=509, bias=False, seed=7)
    # LLM-scale logits (std ≈ 25), where a bf16 logit is off by up to 0.06.
    tensors = {n: (t * 6.0 if "hidden" in n else t).bfloat16().requires_grad_(n.startswith("student"))
               for n, t in tensors.items()}
    loss = fused_linear_kl_div_loss(**tensors, labels=labels, backend="torch")
    (grad_hidden,) = torch.autograd.grad(loss, tensors["student_hidden"])
    exact, leaves = eager_loss(tensors, labels)
    (want,) = torch.autograd.grad(exact, leaves["student_hidden"])
    rounded_leaves = {n: t.detach().float().requires_grad_(n == "student_hidden") for n, t in tensors.items()}
    student_logits = (rounded_leaves["student_hidden"] @ rounded_leaves["student_weight"].T).bfloat16().float()
    teacher_logits = (rounded_leaves["teacher_hidden"] @ rounded_leaves["teacher_weight"].T).bfloat16().float()
    valid = labels != -100
    rounded = torch.where(valid, reference.divergence_rows(student_logits, teacher_logits), 0.0).sum() / valid.sum()
    (rounded_grad,) = torch.autograd.grad(rounded, rounded_leaves["student_hidden"])
    ours = (grad_hidden.double() - want).norm() / want.norm()
    rounding = (rounded_grad.double() - want).norm() / want.norm()
    assert ours < 0.25 * rounding, (ours.item(), rounding.item())


def _autocast_reference(tensors, labels):
    """The unfused loss as autocast computes it: bf16 GEMM operands and bf16 logits, fp32 softmax."""
    leaves = {n: t.detach().clone().requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = leaves["student_hidden"] @ leaves["student_weight"].T
        teacher = leaves["teacher_hidden"] @ leaves["teacher_weight"].T
    valid = labels != -100
    loss = torch.where(valid, reference.divergence_rows(student.float(), teacher.float()), 0.0).sum() / valid.sum()
    return loss, leaves


def test_bf16_gemms_match_autocast_and_follow_ambient_autocast():
    """gemm_dtype=bf16 gives autocast's numbers; under autocast it is the default; fp32 overrides it."""
    tensors, labels = make_problem(rows=40, vocab=307, bias=False, seed=9)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    students = [tensors["student_hidden"], tensors["student_weight"]]
    explicit = fused_linear_kl_div_loss(**tensors, labels=labels, chunk_size=16, gemm_dtype=torch.bfloat16)
    explicit_grads = torch.autograd.grad(explicit, students)
    want, leaves = _autocast_reference(tensors, labels)
    want_grads = torch.autograd.grad(want, [leaves["student_hidden"], leaves["student_weight"]])
    assert explicit.dtype == torch.float32
    torch.testing.assert_close(explicit, want, rtol=1e-4, atol=1e-5)
    for got, expected in zip(explicit_grads, want_grads):
        assert got.dtype == torch.float32
        # Both round each GEMM's output to bf16; dW differs only in where the rounding falls.
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())

    exact = fused_linear_kl_div_loss(**tensors, labels=labels, chunk_size=16)
    exact_grads = torch.autograd.grad(exact, students)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        followed = fused_linear_kl_div_loss(**tensors, labels=labels, chunk_size=16)
        followed_grads = torch.autograd.grad(followed, students)
        forced = fused_linear_kl_div_loss(**tensors, labels=labels, chunk_size=16, gemm_dtype=torch.float32)
        forced_grads = torch.autograd.grad(forced, students)
    assert torch.equal(followed, explicit) and all(map(torch.equal, followed_grads, explicit_grads))
    assert torch.equal(forced, exact) and all(map(torch.equal, forced_grads, exact_grads))
    assert not torch.equal(explicit, exact)


def test_bf16_gemms_for_top_k_and_a_bad_gemm_dtype():
    tensors, labels = make_problem(rows=12, vocab=101, bias=False, seed=10)
    hidden = tensors["student_hidden"].requires_grad_(True)
    teacher = (tensors["teacher_hidden"] @ tensors["teacher_weight"].T).log_softmax(-1).topk(8)
    options = dict(student_weight=tensors["student_weight"], labels=labels, chunk_size=5)
    exact = topk_kl_div_loss(hidden, teacher.values, teacher.indices, **options)
    low = topk_kl_div_loss(hidden, teacher.values, teacher.indices, gemm_dtype=torch.bfloat16, **options)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        followed = topk_kl_div_loss(hidden, teacher.values, teacher.indices, **options)
    assert torch.equal(followed, low) and not torch.equal(low, exact)
    torch.testing.assert_close(low, exact, rtol=3e-2, atol=3e-2)
    with pytest.raises(ValueError, match="gemm_dtype must be"):
        fused_linear_kl_div_loss(**tensors, labels=labels, gemm_dtype=torch.int8)


def test_logits_never_exceed_a_chunk(monkeypatch):
    """Peak memory does not grow with N: no logits block larger than the chunk is ever formed."""
    shapes = []
    original = chunked.HeadGemms.logits

    def recording(self, hidden):
        out = original(self, hidden)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(chunked.HeadGemms, "logits", recording)
    tensors, labels = make_problem(rows=64, vocab=131, seed=8)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    fused_linear_kl_div_loss(**tensors, labels=labels, chunk_size=8, backend="torch").backward()
    assert shapes and max(rows for rows, _ in shapes) <= 8
    # Dropped rows cost nothing: only valid rows reach the matmul.
    assert sum(rows for rows, _ in shapes) == 2 * int((labels != -100).sum())


def test_chunk_size_from_memory_budget():
    cpu = torch.device("cpu")
    assert chunked.pick_chunk_size(100000, 49152, cpu, budget_bytes=256 << 20) == 288
    assert chunked.pick_chunk_size(5, 49152, cpu) == 5
    assert chunked.pick_chunk_size(100000, 10**9, cpu) == 1
    chunk = chunked.pick_chunk_size(10**6, 128256, cpu)
    assert chunk % 16 == 0 and chunk * 128256 * chunked.BYTES_PER_CHUNK_LOGIT <= chunked.MEMORY_BUDGET_BYTES["cpu"]


def test_num_items_in_batch_makes_accumulation_match_one_batch():
    tensors, labels = make_problem(rows=12, vocab=53, seed=9)
    whole = fused_linear_kl_div_loss(**tensors, labels=labels, ce_weight=0.5, backend="torch")
    total = int((labels != -100).sum())
    parts = sum(
        fused_linear_kl_div_loss(**{n: t[part] if "hidden" in n else t for n, t in tensors.items()}, labels=labels[part],
                                 ce_weight=0.5, num_items_in_batch=total, backend="torch")
        for part in (slice(0, 5), slice(5, 12))
    )
    torch.testing.assert_close(parts, whole)


def test_module_and_terms():
    tensors, labels = make_problem(rows=9, vocab=41, seed=10)
    module = FusedLinearKLDivLoss(temperature=2.0, ce_weight=0.25, kd_weight=0.75, backend="torch", return_terms=True)
    terms = module(**tensors, labels=labels)
    torch.testing.assert_close(terms["loss"], 0.75 * terms["kd"] + 0.25 * terms["ce"])
    eager, _ = eager_loss(tensors, labels, temperature=2.0)
    torch.testing.assert_close(terms["kd"].double(), eager.detach(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown option"):
        FusedLinearKLDivLoss(temprature=2.0)


def test_backward_twice_is_an_error():
    tensors, labels = make_problem(rows=4, vocab=11, seed=11)
    tensors["student_hidden"].requires_grad_()
    loss = fused_linear_kl_div_loss(**tensors, labels=labels, backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def _hf(kind, **overrides):
    import transformers

    torch.manual_seed(12)
    base = dict(vocab_size=61, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    if kind == "gemma2":
        config = transformers.Gemma2Config(hidden_size=16, head_dim=8, final_logit_softcapping=3.0, **base, **overrides)
        return transformers.Gemma2ForCausalLM(config).eval()
    if kind == "cohere":
        config = transformers.CohereConfig(hidden_size=24, logit_scale=0.5, **base, **overrides)
        return transformers.CohereForCausalLM(config).eval()
    config = transformers.LlamaConfig(hidden_size=20, tie_word_embeddings=True, **base, **overrides)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("student_kind,teacher_kind", [("gemma2", "cohere"), ("llama", "gemma2")])
def test_hugging_face_helper_matches_model_logits(student_kind, teacher_kind):
    """Soft-capping (Gemma 2), logit scaling (Cohere), tied embeddings, shifted labels and padding."""
    student, teacher = _hf(student_kind), _hf(teacher_kind)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    loss = causal_lm_kl_div_loss(student, teacher, ids, attention_mask=mask, temperature=2.0, ce_weight=0.3,
                                 backend="torch")
    loss.backward()
    head = lm_head_spec(student)["weight"]
    fused_grad = head.grad.clone()
    student.zero_grad()
    logits = student(ids, attention_mask=mask).logits[:, :-1]
    with torch.no_grad():
        teacher_logits = teacher(ids, attention_mask=mask).logits[:, :-1]
    labels = ids.masked_fill(mask == 0, -100)[:, 1:]
    valid = labels != -100
    kd = torch.where(valid, reference.divergence_rows(logits, teacher_logits, 2.0) * 4.0, 0.0).sum() / valid.sum()
    eager = kd + 0.3 * F.cross_entropy(logits.reshape(-1, 61), labels.reshape(-1))
    eager.backward()
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused_grad, head.grad, rtol=1e-4, atol=1e-6)


def test_lm_head_spec_reads_architecture_settings():
    assert lm_head_spec(_hf("gemma2"))["softcap"] == 3.0
    assert lm_head_spec(_hf("cohere"))["logit_scale"] == 0.5
    llama = _hf("llama")
    assert lm_head_spec(llama)["weight"] is llama.model.embed_tokens.weight


def _bad(**changes):
    tensors, _ = make_problem(rows=4, vocab=11, seed=14, bias=False)
    tensors.update(changes)
    return tensors


BAD_INPUTS = [
    (_bad(teacher_weight=torch.randn(12, 24)), r"vocabulary sizes differ: student_weight has 11 rows, teacher_weight 12"),
    (_bad(student_weight=torch.randn(11, 15)), r"student_hidden's last dimension \(16\) must equal student_weight's hidden size \(15"),
    (_bad(teacher_hidden=torch.randn(5, 24)), "same leading"),
    (_bad(student_weight=torch.randn(11, 16).bfloat16()), "student_hidden is torch.float32 but student_weight is torch.bfloat16"),
    (_bad(student_bias=torch.randn(10)), "student_bias has 10 entries"),
    (_bad(student_hidden=torch.ones(4, 16, dtype=torch.long)), "student_hidden must be float32"),
    (_bad(teacher_weight=torch.randn(11)), "teacher_weight must be 2-D"),
    (dict(_bad(), ce_weight=1.0), "ce_weight > 0 needs labels"),
    (dict(_bad(), labels=torch.tensor([0, 1, 2, 11]), ce_weight=1.0), r"labels must lie in \[0, 11\)"),
    (dict(_bad(), chunk_size=0), "chunk_size"),
    (dict(_bad(), student_softcap=-1.0), "student_softcap"),
    (dict(_bad(), ce_weight=-0.5), "ce_weight"),
    (dict(_bad(), temperature=0.0), "temperature"),
    (dict(_bad(), labels=torch.zeros(3, dtype=torch.long)), "leading shape"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS)
def test_bad_input_is_a_clear_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fused_linear_kl_div_loss(**kwargs)


def test_no_grad_computes_the_loss_without_gradient_work(monkeypatch):
    needs = []
    original = chunked.chunked_linear_loss

    def recording(*args, **kwargs):
        needs.append((kwargs["need_grad_hidden"], kwargs["need_grad_weight"], kwargs["need_grad_bias"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunked_linear_loss", recording)
    tensors, labels = make_problem(rows=6, vocab=23, seed=15)
    tensors = {n: t.requires_grad_(n.startswith("student")) for n, t in tensors.items()}
    with torch.no_grad():
        loss = fused_linear_kl_div_loss(**tensors, labels=labels, backend="torch")
    assert needs == [(False, False, False)] and not loss.requires_grad
    torch.testing.assert_close(loss, fused_linear_kl_div_loss(**tensors, labels=labels, backend="torch").detach())
