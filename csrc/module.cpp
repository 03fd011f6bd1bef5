// The Python face of slimlm._C: build information. The ops themselves are
// registered with the dispatcher (ops.cpp, cpu/, cuda/) when this library loads.
#include <torch/extension.h>

#ifdef SLIMLM_OPENMP
#include <omp.h>
#endif

#include "cpu/common/isa.h"

#ifndef SLIMLM_CUDA_ARCHS
#define SLIMLM_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
#ifdef SLIMLM_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(SLIMLM_CUDA_ARCHS);
#ifdef SLIMLM_OPENMP
  info["openmp"] = true;
  info["openmp_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["openmp_threads"] = 1;
#endif
  // The best CPU instruction set; slimlm.build_info() adds the one in use (SLIMLM_CPU_ISA).
  info["cpu_isa_best"] = std::string(slimlm::cpu::isa_name(slimlm::cpu::best_isa()));
  info["torch_version"] = std::string(TORCH_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "slimlm compiled kernels (ops are reached through torch.ops.slimlm)";
  m.def("build_info", &build_info, "Which backends, CUDA architectures and CPU instruction set this build has.");
}
