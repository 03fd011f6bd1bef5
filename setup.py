"""Builds slimlm._C: the C++ CPU kernels always, the CUDA kernels when possible.

SLIMLM_BUILD_CUDA=auto|0|1 (default auto: build when torch has CUDA and nvcc is found).
SLIMLM_CUDA_ARCHS="80;90" picks the GPU architectures (default sm_80 and sm_90).
If no compiler works at all the package still installs; `import slimlm` then warns
once and runs the pure-PyTorch reference.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda(torch_cuda_version):
    mode = os.environ.get("SLIMLM_BUILD_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"SLIMLM_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    from torch.utils.cpp_extension import CUDA_HOME

    available = torch_cuda_version is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        raise SystemExit(
            "SLIMLM_BUILD_CUDA=1 but torch has no CUDA "
            f"(torch.version.cuda={torch_cuda_version}) or nvcc was not found (CUDA_HOME={CUDA_HOME})"
        )
    return mode != "0" and available


def _extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    build_cuda = _want_cuda(torch.version.cuda)
    archs = os.environ.get("SLIMLM_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    cxx_flags = ["-O3", "-std=c++20", "-fno-math-errno", "-DSLIMLM_OPENMP" if openmp else "-USLIMLM_OPENMP"] + openmp
    sources = ["csrc/module.cpp", "csrc/ops.cpp"] + _sources("csrc/cpu/*.cpp")
    macros = []
    if build_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_binding.cpp")
        macros.append(("SLIMLM_WITH_CUDA", None))
        arch_list = ";".join(a.strip() for a in archs if a.strip())
        macros.append(("SLIMLM_CUDA_ARCHS", f'"{arch_list}"'))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        for arch in archs:
            arch = arch.strip()
            if arch:
                nvcc_flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
        ext = CUDAExtension(
            "slimlm._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=openmp,
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    else:
        ext = CppExtension(
            "slimlm._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=openmp,
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    return [ext]


def _setup_kwargs():
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        print("slimlm: torch is not importable at build time; installing without compiled kernels", file=sys.stderr)
        return {}

    class BuildExtensionOrSkip(BuildExtension):
        """Compiles slimlm._C; a failed compile leaves a working pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # any compiler failure: keep the install usable
                if os.environ.get("SLIMLM_REQUIRE_EXTENSION") == "1":
                    raise
                print(
                    f"slimlm: building the compiled kernels failed ({error}); "
                    "the package will use its pure-PyTorch reference",
                    file=sys.stderr,
                )

    use_ninja = shutil.which("ninja") is not None
    return {
        "ext_modules": _extensions(),
        "cmdclass": {"build_ext": BuildExtensionOrSkip.with_options(use_ninja=use_ninja)},
    }


setup(**_setup_kwargs())
