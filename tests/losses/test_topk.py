"""The top-k loss's two forms: ``fused_linear_topk_kl_div_loss`` on hidden states and the student's
head, and ``topk_kl_div_loss`` on logits, which forwards the combined spelling (``student_weight=``)."""
import pytest
import torch

from slimlm.architectures import LMHead
from slimlm.losses import fused_linear_topk_kl_div_loss, topk_kl_div_loss


def _problem():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 12, generator=gen).requires_grad_()
    weight = (torch.randn(41, 12, generator=gen) * 0.5).requires_grad_()
    teacher = torch.randn(3, 5, 41, generator=gen).log_softmax(-1).topk(6)
    labels = torch.randint(0, 41, (3, 5), generator=gen)
    labels[0, :2] = -100
    return hidden, weight, teacher.values, teacher.indices, labels


def test_combined_spelling_is_the_fused_form():
    hidden, weight, logprobs, indices, labels = _problem()
    options = dict(labels=labels, temperature=2.0, ce_weight=0.3, chunk_size=4, student_softcap=5.0)
    fused = fused_linear_topk_kl_div_loss(hidden, weight, logprobs, indices, **options)
    fused_grads = torch.autograd.grad(fused, (hidden, weight))
    combined = topk_kl_div_loss(hidden, logprobs, indices, student_weight=weight, **options)
    combined_grads = torch.autograd.grad(combined, (hidden, weight))
    assert torch.equal(fused, combined) and all(map(torch.equal, fused_grads, combined_grads))
    by_head = fused_linear_topk_kl_div_loss(hidden, LMHead(weight, softcap=5.0), logprobs, indices,
                                            **{k: v for k, v in options.items() if k != "student_softcap"})
    assert torch.equal(by_head, fused.detach())


def test_fused_form_matches_the_logits_form_without_ce():
    hidden, weight, logprobs, indices, labels = _problem()
    for reduction in ("batchmean", "mean", "sum", "none"):
        fused = fused_linear_topk_kl_div_loss(hidden, weight, logprobs, indices, labels=labels, reduction=reduction,
                                              chunk_size=3, backend="torch")
        logits = (hidden @ weight.T).detach()
        eager = topk_kl_div_loss(logits, logprobs, indices, labels=labels, reduction=reduction, backend="torch")
        torch.testing.assert_close(fused.detach(), eager, rtol=1e-5, atol=1e-6)


def test_logits_form_refuses_the_head_options_it_would_ignore():
    _, _, logprobs, indices, _ = _problem()
    logits = torch.randn(3, 5, 41)
    # Options at their fused-form defaults change nothing and are accepted.
    topk_kl_div_loss(logits, logprobs, indices, ce_weight=0.0, chunk_size=None, student_bias=None)
    with pytest.raises(ValueError, match="chunk_size apply to the fused form"):
        topk_kl_div_loss(logits, logprobs, indices, chunk_size=4)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        topk_kl_div_loss(logits, logprobs, indices, chunksize=4)
