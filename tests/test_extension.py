"""The compiled extension's face: build_info, and the choice of the CPU kernels' instruction set."""
import pytest
import torch

from slimlm import _extension, build_info, kl_div_loss

needs_extension = pytest.mark.skipif(not _extension.has_op("kl_div_fwd"), reason="slimlm._C not built")


@needs_extension
def test_build_info_reports_the_variant_in_use(monkeypatch):
    monkeypatch.delenv("SLIMLM_CPU_ISA", raising=False)
    info = build_info()
    assert info["cpu_isas"][0] == "scalar" and info["cpu_isa"] == info["cpu_isas"][-1] == info["cpu_isa_best"]
    for isa in _extension.cpu_isas():
        monkeypatch.setenv("SLIMLM_CPU_ISA", isa)
        assert build_info()["cpu_isa"] == isa


@needs_extension
@pytest.mark.parametrize("value", ["avx1024", "AVX2", "sse"])
def test_unknown_variant_is_a_value_error_before_any_kernel(value, monkeypatch):
    monkeypatch.setenv("SLIMLM_CPU_ISA", value)
    with pytest.raises(ValueError, match=r"SLIMLM_CPU_ISA must be one of scalar, avx2, avx512, got"):
        kl_div_loss(torch.randn(2, 9), torch.randn(2, 9))
    # Below the Python layer, the C++ guard refuses it too instead of picking a variant.
    with pytest.raises(RuntimeError, match="SLIMLM_CPU_ISA must be scalar, avx2 or avx512"):
        torch.ops.slimlm.kl_div_fwd(torch.randn(2, 9), torch.randn(2, 9), None, -100, 1.0, 0.0, 1.0, True)


@needs_extension
def test_variant_the_cpu_lacks_is_refused(monkeypatch):
    """On a CPU without AVX-512 (simulated: the extension reports avx2 as its best), asking for it is
    an error naming what the CPU runs, not a silent fall back to another variant."""
    monkeypatch.setattr(_extension, "COMPILED", {"cpu": True, "cpu_isa_best": "avx2"})
    monkeypatch.setenv("SLIMLM_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match=r"SLIMLM_CPU_ISA=avx512: this CPU runs the scalar, avx2 variants only"):
        _extension.cpu_isa()
    monkeypatch.undo()
    if "avx512" not in _extension.cpu_isas():  # a real AVX2 machine: the C++ guard refuses it as well
        monkeypatch.setenv("SLIMLM_CPU_ISA", "avx512")
        with pytest.raises(RuntimeError, match="runs at most avx2"):
            torch.ops.slimlm.kl_div_fwd(torch.randn(2, 9), torch.randn(2, 9), None, -100, 1.0, 0.0, 1.0, True)
