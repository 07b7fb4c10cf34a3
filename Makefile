# One line each: `make test` installs into .venv and runs the suite; `make serve` serves the demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# ONNX Runtime's build: onnxruntime-gpu (CUDA 13) where an NVIDIA driver is present, else the CPU one.
# Both are the same import; override with `make ORT=cpu ...`.
ORT ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu)

.PHONY: install test test-fast lint serve clean bench-venv bench-export bench-server bench-levers bench-targets \
	bench-single bench-concurrency bench-ttft bench-startup

install: $(VENV)/.installed

# torch first, pinned: it takes the local CPU wheel, so nothing pulls the CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev]'
	touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .

# Serve the demo model (or MODEL_PATH / CLASSIFIER_PATH, see README) on HOST:PORT (default 0.0.0.0:8000).
serve: install
	$(BIN)/python -m app

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks (see BENCHMARKS.md). The Optimum anchor needs its own venv: it pins transformers 4.x.
bench-venv: bench/.venv-optimum/.installed

bench/.venv-optimum/.installed:
	$(PYTHON) -m venv bench/.venv-optimum
	bench/.venv-optimum/bin/pip install -q torch==2.13.0
	bench/.venv-optimum/bin/pip install -q 'optimum-onnx[onnxruntime]==0.1.0' onnxruntime
	touch $@

bench-export: install bench-venv
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev,bench]'
	$(BIN)/python -m bench.export_bench

bench-server: install
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev,bench]'
	$(BIN)/python -m bench.server_bench

# Issue 7: each lever alone (engine level), and each target through HTTP against transformers.
bench-levers: install
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev,bench]'
	$(BIN)/python -m bench.levers

bench-single bench-concurrency bench-ttft bench-startup: install
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev,bench]'
	$(BIN)/python -m bench.targets $(subst bench-,,$@) --update-md

bench-targets: bench-single bench-concurrency bench-ttft bench-startup
