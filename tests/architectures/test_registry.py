"""The architecture layer on every registered family: the LM-head view gives the model's own
logits, parameter parts cover the model, and the fused loss takes LMHead values."""
import pytest
import torch

from slimlm import LMHead, fused_linear_kl_div_loss, lm_head_spec
from slimlm.architectures import PARTS, get_adapter, lm_head
from slimlm.surgery.planning import count_parameters
from tiny import ARCHITECTURES, tiny_model


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_lm_head_view_gives_the_models_logits(model_type):
    model = tiny_model(model_type)
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids).logits.float()
        hidden = model.model(input_ids).last_hidden_state
        head = lm_head(model)
        torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-5, atol=1e-5)
    assert (head.weight is model.get_input_embeddings().weight) == get_adapter(model).tied(model)
    assert lm_head_spec(model) == {"weight": head.weight, "bias": head.bias, "logit_scale": head.logit_scale,
                                   "softcap": head.softcap}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_parameter_parts_match_the_module_names(model_type):
    """The adapter's parts agree with the transformers names of these families."""
    model = tiny_model(model_type)
    counts = count_parameters(model, get_adapter(model))
    assert set(counts) == {*PARTS, "total"}
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    by_name = dict.fromkeys(PARTS, 0)
    for name, parameter in model.named_parameters():
        part = ("embeddings" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head")
                else "attention" if ".self_attn." in name else "mlp" if ".mlp." in name else "norms")
        by_name[part] += parameter.numel()
    assert {part: counts[part] for part in PARTS} == by_name


def test_fused_loss_takes_lm_head_values():
    generator = torch.Generator().manual_seed(0)
    student_hidden, teacher_hidden = torch.randn(6, 8, generator=generator), torch.randn(6, 12, generator=generator)
    student = LMHead(torch.randn(20, 8, generator=generator), torch.randn(20, generator=generator), 0.5, 3.0)
    teacher = LMHead(torch.randn(20, 12, generator=generator), None, 2.0, None)
    by_keywords = fused_linear_kl_div_loss(
        student_hidden, student.weight, teacher_hidden, teacher.weight, student_bias=student.bias,
        student_logit_scale=student.logit_scale, student_softcap=student.softcap,
        teacher_logit_scale=teacher.logit_scale,
    )
    torch.testing.assert_close(fused_linear_kl_div_loss(student_hidden, student, teacher_hidden, teacher), by_keywords)
    with pytest.raises(ValueError, match="student_weight is an LMHead"):
        fused_linear_kl_div_loss(student_hidden, student, teacher_hidden, teacher, student_softcap=2.0)
