#!/usr/bin/env bash
# Builds slimlm as a wheel, installs it into a fresh virtualenv (outside the source
# tree) and checks that it imports with its compiled CPU kernels live.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

SLIMLM_REQUIRE_EXTENSION=1 SLIMLM_BUILD_CUDA=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$ROOT"
WHEEL=$(ls "$WORK"/dist/slimlm-*.whl)
echo "built $(basename "$WHEEL")"

python3 -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements/ci.txt" torch
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements/ci.txt" "$WHEEL"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import warnings
warnings.simplefilter("error")  # a missing extension warns at import: make it fatal here
import torch
import slimlm
live = slimlm.backends()
info = slimlm.build_info()
assert live["cpu"], f"compiled CPU kernels not live in the installed wheel: {live}"
assert slimlm.__file__.startswith(__import__("sys").prefix), slimlm.__file__
student = torch.randn(4, 1000, requires_grad=True)
loss = slimlm.kl_div_loss(student, torch.randn(4, 1000))
loss.backward()
print(f"wheel ok: {slimlm.__file__}\n  backends {live}\n  build {info}\n  loss {loss.item():.4f}")
PY
