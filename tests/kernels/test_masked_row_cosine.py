"""masked_row_cosine on every backend against the fp64 reference, and its contract."""
import pytest
import torch

from conftest import available_backends
from slimlm import _extension
from slimlm.kernels import reference
from slimlm.kernels.masked_row_cosine import masked_row_cosine

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, channels): one row, odd C, large C across several chunks.
SHAPES = [(1, 7), (37, 576), (9, 4099), (4, 8192)]


def layer_pair(rows, channels, dtype, seed):
    """A layer's input and output: the output is the input plus a smaller update (cosines near 1, as in LLMs)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=gen)
    x[:, :: max(1, channels // 4)] *= 200.0
    y = x + 0.3 * torch.randn(rows, channels, generator=gen) * x.abs().mean()
    return x.to(dtype), y.to(dtype)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,channels", SHAPES)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_backend_matches_fp64_reference(backend, device, dtype, rows, channels, masked):
    a, b = layer_pair(rows, channels, dtype, seed=rows * channels)
    mask = (torch.arange(rows) % 3 != 1) if masked else None
    truth = reference.masked_row_cosine(a.double(), b.double(), mask, 1e-8)
    plain = reference.masked_row_cosine(a, b, mask, 1e-8)
    out = masked_row_cosine(a.to(device), b.to(device), mask.to(device) if masked else None, backend=backend).cpu()
    assert out.dtype == torch.float32 and out.shape == (rows,)
    assert max_err(out, truth) <= 2 * max_err(plain, truth) + 1e-6
    if masked:
        assert torch.all(out[~mask] == 0)


@pytest.mark.parametrize("backend", available_backends(None))
def test_known_values_and_leading_dims(backend, device):
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]]])
    b = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]], [[-3.0, -4.0], [1.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = masked_row_cosine(a.to(device), b.to(device), mask.to(device), backend=backend).cpu()
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 0.0], [-1.0, 1.0, 0.0]]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", available_backends(None))
def test_masked_rows_are_not_read(backend, device):
    a, b = layer_pair(6, 100, torch.float32, 0)
    mask = torch.tensor([True, False, True, False, True, True])
    poisoned = a.clone()
    poisoned[~mask] = float("nan")
    out = masked_row_cosine(poisoned.to(device), b.to(device), mask.to(device), backend=backend).cpu()
    torch.testing.assert_close(out, masked_row_cosine(a, b, mask, backend="torch"), rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="must match"):
        masked_row_cosine(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_row_cosine(torch.randn(3, 4), torch.randn(3, 4), torch.ones(4, dtype=torch.bool))


@pytest.mark.skipif(not _extension.has_op("masked_row_cosine"), reason="slimlm._C not built")
def test_opcheck():
    a, b = torch.randn(5, 12), torch.randn(5, 12)
    torch.library.opcheck(torch.ops.slimlm.masked_row_cosine.default, (a, b, torch.rand(5) > 0.5, 1e-8))
    torch.library.opcheck(torch.ops.slimlm.masked_row_cosine.default, (a.half(), b.half(), None, 1e-8))
