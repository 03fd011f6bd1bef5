#!/usr/bin/env bash
# Compile check of the CUDA kernels, no GPU and no CUDA torch needed: every csrc/cuda/*.cu
# through `nvcc -c` for each architecture in SLIMLM_CUDA_ARCHS (default "80;90"), with the
# flags setup.py and torch's CUDAExtension pass, into a temporary folder. Fails on any
# compile error; reports each kernel that spills registers to local memory. Then, where
# a torch is importable (a CPU build will do: it ships the c10/cuda headers), checks that
# every csrc/cuda/*_binding.cpp compiles against them (syntax and types, no link).
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
ARCHS=${SLIMLM_CUDA_ARCHS:-80;90}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc_check: $NVCC not found" >&2
  exit 1
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "nvcc_check: no csrc/cuda/*.cu to compile"
  exit 0
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

archs=()
gencode=()
for arch in ${ARCHS//[;,]/ }; do
  archs+=("sm_$arch")
  gencode+=(-gencode "arch=compute_$arch,code=sm_$arch")
done

# setup.py's nvcc flags, plus the ones torch's CUDAExtension adds (the half/bfloat16
# operator macros change which conversions compile).
flags=(-O3 -std=c++20 --expt-relaxed-constexpr -lineinfo -Xcompiler -fPIC -Icsrc
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -Xptxas -v)

echo "nvcc_check: $("$NVCC" --version | tail -n 1)"
status=0
for src in "${sources[@]}"; do
  name=$(basename "$src" .cu)
  log="$out/$name.log"
  if "$NVCC" -c "${flags[@]}" "${gencode[@]}" "$src" -o "$out/$name.o" >"$log" 2>&1; then
    echo "compiled $src for ${archs[*]}"
    # ptxas -v prints "N bytes spill stores" under each kernel; any N > 0 is worth a look.
    if grep -qE '[1-9][0-9]* bytes spill (stores|loads)' "$log"; then
      echo "  warning: register spills in $src:"
      grep -E "Compiling entry function|[1-9][0-9]* bytes spill" "$log" | grep -B1 -E "[1-9][0-9]* bytes spill" | sed 's/^/    /'
    fi
  else
    echo "FAILED $src" >&2
    grep -v "^ptxas info" "$log" >&2 || true
    status=1
  fi
done

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
bindings=(csrc/cuda/*_binding.cpp)
if [ ${#bindings[@]} -gt 0 ] && torch_include=$("$PY" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join(include_paths()))' 2>/dev/null); then
  # nvcc may be a wrapper script outside the toolkit: take the first candidate with the headers.
  cuda_home=
  for candidate in "${CUDA_HOME:-}" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")" /usr/local/cuda; do
    if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ]; then
      cuda_home=$candidate
      break
    fi
  done
  if [ -z "$cuda_home" ]; then
    echo "nvcc_check: cuda_runtime.h not found (set CUDA_HOME)" >&2
    exit 1
  fi
  python_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  includes=()
  for dir in $torch_include; do includes+=(-isystem "$dir"); done
  # A CPU build of torch lacks this generated header of the CUDA build; it only sets
  # export macros, so an empty stand-in serves a syntax check.
  if ! ls ${torch_include%% *}/c10/cuda/impl/cuda_cmake_macros.h >/dev/null 2>&1; then
    mkdir -p "$out/shim/c10/cuda/impl"
    echo '#pragma once' >"$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
    includes+=(-isystem "$out/shim")
  fi
  includes+=(-isystem "$cuda_home/include" -isystem "$python_include" -Icsrc)
  for src in "${bindings[@]}"; do
    if ${CXX:-g++} -std=c++20 -fsyntax-only -Wall -Wextra "${includes[@]}" "$src"; then
      echo "checked $src against $("$PY" -c 'import torch; print("torch", torch.__version__)') headers"
    else
      echo "FAILED $src" >&2
      status=1
    fi
  done
else
  echo "nvcc_check: no torch importable by $PY; bindings not checked"
fi
exit $status
