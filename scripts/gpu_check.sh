#!/usr/bin/env bash
# The GPU check: one prepared run for a lent GPU machine (/work/.library/device/README.md),
# which has its own CUDA torch, Triton, nvcc, ninja and pytest-benchmark, no network and no
# virtualenv. It builds slimlm._C in place against that torch with the CUDA kernels, runs
# the kernel tests on CUDA tensors (cuda and triton backends) and the GPU benchmarks, and
# leaves under $OUT: summary.txt (one line per section), bench.csv (every benchmark row)
# and gpu_check.tar.gz (each section's log and junit XML). $OUT stays within the device
# tool's limit of 8 files.
#
# Sections run in order, each under `timeout` and all inside GPU_CHECK_BUDGET_S (default
# 450 s, so a call with an 8-minute limit still gets its files back). A failed section is
# recorded and the next one still runs; the exit status is 1 if any failed; sections that
# find the budget spent are reported as skipped. GPU_CHECK_SKIP="name|name" leaves sections
# out (e.g. to fit the others in one call). To add a kernel's check, append a `section`,
# `pytest_section` or `bench_section` line at the end of this file.
#
# Usage: from a session with a lent machine, the device tool's
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# (it sets OUT; elsewhere OUT defaults to out/gpu_check). Nothing needs carrying: the
# extension is built there, against that machine's torch.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUT=${OUT:-$ROOT/out/gpu_check}
PY=${PY:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/logs"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

export PYTHONPATH=$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export SLIMLM_BENCH_CSV=$OUT/bench.csv
export TRITON_CACHE_DIR=$WORK/triton-cache
unset TRITON_INTERPRET SLIMLM_BACKEND
# The lent GPUs are Hopper: build sm_90 only (sm_80 is compile-checked by nvcc_check.sh).
export SLIMLM_CUDA_ARCHS=${SLIMLM_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

failed=0
deadline=$((SECONDS + BUDGET_S))

# section NAME LIMIT_S COMMAND...: runs COMMAND with at most LIMIT_S seconds (less when the
# budget is nearly spent), its output in logs/NAME.log; prints the log's tail.
section() {
  local name=$1 limit=$2 left status start
  shift 2
  if [ -n "${GPU_CHECK_SKIP:-}" ] && [[ $name =~ ^(${GPU_CHECK_SKIP})$ ]]; then
    printf '%-24s not run (GPU_CHECK_SKIP)\n' "$name" | tee -a "$SUMMARY"
    return
  fi
  left=$((deadline - SECONDS))
  if ((left < limit)); then limit=$left; fi
  if ((limit < 15)); then
    printf '%-24s SKIPPED (budget of %ss spent)\n' "$name" "$BUDGET_S" | tee -a "$SUMMARY"
    failed=1
    return
  fi
  echo "=== $name (up to ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  status=$?
  tail -n 25 "$WORK/logs/$name.log"
  if ((status == 124 || status == 137)); then
    printf '%-24s TIMEOUT after %ss\n' "$name" "$((SECONDS - start))" | tee -a "$SUMMARY"
    failed=1
  elif ((status != 0)); then
    printf '%-24s FAILED (exit %s) in %ss\n' "$name" "$status" "$((SECONDS - start))" | tee -a "$SUMMARY"
    failed=1
  else
    printf '%-24s ok in %ss\n' "$name" "$((SECONDS - start))" | tee -a "$SUMMARY"
  fi
}

# pytest_section NAME LIMIT_S PYTEST_ARGS...: a section running pytest with a junit report.
pytest_section() {
  local name=$1 limit=$2
  shift 2
  section "$name" "$limit" "$PY" -m pytest -q -rfEs --junitxml="$WORK/logs/$name.xml" "$@"
}

# bench_section NAME LIMIT_S FILE [PYTEST_ARGS...]: a benchmark file, if it is in the tree.
bench_section() {
  local name=$1 limit=$2 file=$3
  shift 3
  if [ ! -f "$file" ]; then
    printf '%-24s SKIPPED (%s not in the tree)\n' "$name" "$file" | tee -a "$SUMMARY"
    return
  fi
  pytest_section "$name" "$limit" "$file" --benchmark-only "$@"
}

finish() {
  local failures
  failures=$(grep -h -E "^(FAILED|ERROR) " "$WORK"/logs/*.log 2>/dev/null | cut -c1-200 | head -n 40)
  tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" logs 2>/dev/null
  rm -rf "$WORK"
  echo
  if [ -n "$failures" ]; then
    echo "=== failed tests (first 40)"
    echo "$failures"
  fi
  echo "=== gpu_check summary (${SECONDS}s of ${BUDGET_S}s; logs in gpu_check.tar.gz)"
  cat "$SUMMARY"
  if [ -f "$OUT/bench.csv" ]; then
    echo "=== bench.csv ($(($(wc -l <"$OUT/bench.csv") - 1)) rows), CUDA rows:"
    grep -iE "^op,|cuda|nvidia|h100|h200" "$OUT/bench.csv" | cut -c1-160 | head -n 60
  fi
  exit "$failed"
}
trap finish EXIT

# ---------------------------------------------------------------------------------------
# Environment and build (shared by every kernel).
# ---------------------------------------------------------------------------------------
section env 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; \
  nvcc --version | tail -n 2; \
  $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name()); print(\"triton\", triton.__version__)'"

section build 240 env SLIMLM_BUILD_CUDA=1 SLIMLM_REQUIRE_EXTENSION=1 "$PY" setup.py build_ext --inplace

section extension 30 "$PY" -c "
import slimlm
live, info = slimlm.backends(), slimlm.build_info()
print(live, info)
assert live['cuda'] and info['cuda'], 'the CUDA kernels are not live'
assert live['triton'], 'Triton is not usable'
"

# ---------------------------------------------------------------------------------------
# Kernel tests on CUDA tensors: every test parametrised by the cuda or triton backend (each
# backend on its native device, see tests/conftest.py) and the GPU-only tests.
# ---------------------------------------------------------------------------------------
pytest_section tests-kernels-gpu 180 tests/kernels -k "cuda or triton or gpu"

# ---------------------------------------------------------------------------------------
# KL distillation loss benchmark (includes 8192 x 128256 bf16 when CUDA is present).
# ---------------------------------------------------------------------------------------
bench_section bench-kl-div 150 benchmarks/bench_kl_div.py

# Append further sections below, e.g.:
#   bench_section bench-importance 60 benchmarks/bench_importance.py

# ---------------------------------------------------------------------------------------
# Distillation losses that never materialise the vocabulary (issue 3): the fused linear KL,
# the sparse top-k teacher and the hidden-state loss on CUDA tensors (cuda and triton
# backends; the fused loss's CUDA matmuls with fp32 output), then the fused-linear benchmark
# (N=8192, H=4096, V=128256 bf16 against eager, torch.compile and liger-kernel if present).
# ---------------------------------------------------------------------------------------
pytest_section tests-losses-gpu 150 tests/losses tests/kernels/test_topk_kl.py -k "cuda or triton or gpu"
bench_section bench-fused-linear 200 benchmarks/bench_fused_linear.py -k cuda -s

# ---------------------------------------------------------------------------------------
# Importance scoring (issue 4). Its kernels' tests (tests/kernels/test_masked_seq_stats.py,
# test_masked_row_cosine.py) already run on CUDA in tests-kernels-gpu above; this runs
# estimate_importance with the hooks on the GPU against the CPU, on tiny models.
# ---------------------------------------------------------------------------------------
pytest_section tests-importance-gpu 90 tests/importance -k gpu
