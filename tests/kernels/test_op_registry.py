"""The op registry: every op declared once, its Triton form a custom op with the shared fake."""
import importlib

import pytest
import torch

import slimlm.losses  # noqa: F401  (imports every op module)
from slimlm.kernels import dispatch, registry
from slimlm.kernels.triton import runtime

EXPECTED = {"kl_div_fwd", "topk_kl_fwd", "masked_seq_stats", "masked_row_cosine"}


def test_every_op_is_declared_once():
    import slimlm.importance  # noqa: F401

    assert set(registry.OPS) == EXPECTED
    with pytest.raises(RuntimeError, match="declared twice"):
        registry.declare("kl_div_fwd", reference=None, fake=None, triton_module="x")


def _sample_args(name):
    gen = torch.Generator().manual_seed(0)
    if name == "masked_seq_stats":
        return (torch.randn(2, 5, 8, generator=gen), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool(), 2)
    if name == "masked_row_cosine":
        return (torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen), torch.ones(6, dtype=torch.bool), 1e-8)
    if name == "kl_div_fwd":
        return (torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen), None, -100, 1.0, 0.5, 1.0, True)
    logprobs, indices = torch.log_softmax(torch.randn(3, 11, generator=gen), -1).topk(4, -1)
    return (torch.randn(3, 11, generator=gen), logprobs.contiguous(), indices.contiguous(), None, -100, 1.0, 0.0,
            1.0, False, True)


@pytest.mark.skipif(not (dispatch.backends()["triton"] and runtime.interpreted()),
                    reason="Triton not installed / not interpreted on CPU tensors here")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_triton_form_is_a_custom_op_matching_the_reference(name):
    op = registry.OPS[name]
    importlib.import_module(op.triton_module)
    custom = getattr(torch.ops.slimlm, f"{name}_triton")
    args = _sample_args(name)
    torch.library.opcheck(custom, args, test_utils=("test_schema", "test_faketensor"))
    got, want = op(*args, backend="triton"), op.reference(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
