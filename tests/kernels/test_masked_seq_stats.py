"""masked_seq_stats on every backend against the fp64 reference, and its contract."""
import pytest
import torch

from conftest import available_backends
from slimlm import _extension
from slimlm.kernels import reference
from slimlm.kernels.masked_seq_stats import masked_seq_stats

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, seq, channels, group_size): seq length 1, odd and large C, heads of 64/128, an odd group.
SHAPES = [(2, 1, 7, 1), (3, 19, 4099, 1), (2, 33, 576, 64), (2, 5, 96, 3), (1, 6, 8192, 128), (2, 4, 2048, 1)]


def activations(shape, dtype, seed):
    """LLM-like activations: unit noise with a few massive channels (hundreds), as in real hidden states."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    x[..., :: max(1, shape[-1] // 5)] *= 300.0
    return x.to(dtype)


def padding_mask(batch, seq, seed):
    """Random padding, with sample 0 all padding (a batch can hold one)."""
    mask = torch.rand(batch, seq, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[:, -1] = True
    mask[0] = False
    return mask


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("backend", available_backends(None))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,seq,channels,group", SHAPES)
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
def test_backend_matches_fp64_reference(backend, device, dtype, batch, seq, channels, group, masked):
    x = activations((batch, seq, channels), dtype, seed=channels + seq)
    mask = padding_mask(batch, seq, seed=seq) if masked else None
    truth = reference.masked_seq_stats(x.double(), mask, group)
    plain = reference.masked_seq_stats(x, mask, group)
    out = masked_seq_stats(x.to(device), mask.to(device) if masked else None, group, backend=backend).cpu()
    assert out.dtype == torch.float32 and out.shape == (3, batch, channels // group)
    # Error against fp64 at most ~2x plain torch's in the same dtype, plus fp32 rounding of the result.
    tol = 2 * max_err(plain, truth) + 2e-6 * truth.abs().max().item() + 1e-6
    assert max_err(out, truth) <= tol
    if masked:
        assert torch.all(out[:, 0] == 0), "an all-padding sample must contribute nothing"


@pytest.mark.parametrize("backend", available_backends(None))
def test_padding_is_never_read(backend, device):
    x = torch.randn(2, 9, 130, device=device)
    mask = torch.ones(2, 9, dtype=torch.long, device=device)
    mask[1, 4:] = 0
    poisoned = x.clone()
    poisoned[1, 4:] = float("nan")
    for group in (1, 10):
        expected = masked_seq_stats(x, mask, group, backend="torch")
        out = masked_seq_stats(poisoned, mask, group, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", available_backends(None))
def test_head_norm_sums_by_hand(backend, device):
    """Heads of a (B, S, H*D) tensor: sums of each head's per-token L2 norm over valid tokens."""
    x = torch.randn(2, 3, 4 * 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    out = masked_seq_stats(x.to(device), mask.to(device), 5, backend=backend).cpu()
    norms = x.view(2, 3, 4, 5).norm(dim=-1)
    expected_sum = torch.stack([norms[0, :2].sum(0), norms[1, :1].sum(0)])
    torch.testing.assert_close(out[0], expected_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], expected_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2], torch.stack([norms[0, :2].square().sum(0), norms[1, :1].square().sum(0)]))


def test_fp64_runs_the_reference():
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out = masked_seq_stats(x, None, 2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.masked_seq_stats(x, None, 2))


@pytest.mark.parametrize(
    "shape,mask_shape,group,match",
    [((2, 3), None, 1, "batch, seq, channels"), ((2, 3, 8), None, 3, "group_size"), ((2, 3, 8), (3, 2), 1, "mask")],
)
def test_bad_arguments_are_value_errors(shape, mask_shape, group, match):
    mask = torch.ones(mask_shape, dtype=torch.bool) if mask_shape else None
    with pytest.raises(ValueError, match=match):
        masked_seq_stats(torch.randn(shape), mask, group)


@pytest.mark.skipif(not _extension.has_op("masked_seq_stats"), reason="slimlm._C not built")
def test_opcheck():
    x = torch.randn(2, 5, 12)
    mask = torch.rand(2, 5) > 0.5
    torch.library.opcheck(torch.ops.slimlm.masked_seq_stats.default, (x, mask, 4))
    torch.library.opcheck(torch.ops.slimlm.masked_seq_stats.default, (x.bfloat16(), None, 1))
