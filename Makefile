# One line each: `make test` installs into .venv and runs the suite; `make serve` serves the demo.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# ONNX Runtime's build: onnxruntime-gpu (CUDA 13) where an NVIDIA driver is present, else the CPU one.
# Both are the same import; override with `make ORT=cpu ...`.
ORT ?= $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu)

.PHONY: install test test-fast coverage lint serve clean image image-test replica-test k8s-test bench-venv bench-export \
	bench-server bench-levers bench-targets bench-single bench-concurrency bench-ttft bench-startup bench-aiperf-venv \
	bench-aiperf guidellm-venv

install: $(VENV)/.installed

# torch first, pinned: it takes the local CPU wheel, so nothing pulls the CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev]'
	# The official TGI client, pinned in constraints.txt. --no-deps: its metadata caps huggingface-hub
	# below 1.0, which transformers 5 excludes; its real runtime needs (aiohttp, pydantic, requests) are in dev.
	$(BIN)/pip install -q -c constraints.txt --no-deps text-generation
	touch $@

# The suite on TEST_WORKERS pytest-xdist workers, a file per worker at a time (a module's server is
# started once): most tests wait on a server, an export child or a client, so 3 workers keep this
# 2-core machine busy. TEST_WORKERS=0 runs in one process. Tests marked `serial` (stall thresholds
# that the other workers' load would trip) run afterwards, alone.
TEST_WORKERS ?= 3
PYTEST := $(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: install guidellm-venv
	$(BIN)/ruff check .
	$(PYTEST) -m "not serial"
	$(BIN)/python -m pytest -m serial

# Line coverage of app/, model/ and export/ over the whole suite (in-process code; servers run in
# their own processes and are not counted), as README "Tests" reports it.
coverage: install guidellm-venv
	$(PYTEST) -m "not serial" --cov=app --cov=model --cov=export --cov-report=
	$(BIN)/python -m pytest -m serial --cov=app --cov=model --cov=export --cov-append --cov-report=term

# guidellm (vLLM's benchmark tool), run unchanged by tests/app/test_guidellm.py, in its own venv: its
# dependencies (click~=8.4, datasets) are not ours. Exact versions in tests/guidellm-constraints.txt.
GUIDELLM_VENV := tests/.venv-guidellm
guidellm-venv: $(GUIDELLM_VENV)/.installed

$(GUIDELLM_VENV)/.installed: tests/guidellm-constraints.txt
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/pip install -q --upgrade pip
	$(GUIDELLM_VENV)/bin/pip install -q torch==2.13.0
	$(GUIDELLM_VENV)/bin/pip install -q -c tests/guidellm-constraints.txt guidellm
	touch $@

test-fast: install
	$(PYTEST) -m "not slow"

lint: install
	$(BIN)/ruff check .

# Serve the demo model (or MODEL_PATH / CLASSIFIER_PATH, see README) on HOST:PORT (default 0.0.0.0:8000).
serve: install
	$(BIN)/python -m app

clean:
	rm -rf $(VENV) .pytest_cache $(GUIDELLM_VENV)

# Deployment (docs/DEPLOY.md). The CPU image with podman, on a host with no registry: a Debian
# bookworm base from debootstrap, the local torch wheel, this host's CA bundle (deploy/podman/).
image:
	deploy/podman/build.sh localhost/gpt2-serve:cpu

# Build the CPU image, run it, check it (tests/deploy/test_image.py). Needs podman, runc, debootstrap.
image-test: install
	GPT2_IMAGE_TEST=1 $(BIN)/python -m pytest -m image tests/deploy/test_image.py -o log_cli=true --log-cli-level=INFO

# 3 replicas behind HAProxy under load: kill -9, rolling restart, spread (needs haproxy).
replica-test: install
	$(BIN)/python -m pytest tests/deploy/test_replicas.py -o log_cli=true --log-cli-level=INFO

# Render the Kubernetes overlays and validate them offline.
k8s-test: install
	$(BIN)/python -m pytest tests/deploy/test_k8s.py

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

# Issue 14: NVIDIA's AIPerf, a standard LLM serving benchmark, in its own venv (its dependencies are
# not ours), run unchanged against /v1/completions. See README "Load test and benchmarks".
AIPERF_VENV := bench/.venv-aiperf
AIPERF_VERSION := 0.13.0
bench-aiperf-venv: $(AIPERF_VENV)/.installed

$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q torch==2.13.0
	$(AIPERF_VENV)/bin/pip install -q 'aiperf==$(AIPERF_VERSION)'
	touch $@

# Against a running server (make serve): streamed /v1/completions, greedy, loadtest's prompts, the demo
# tokenizer from model/demo/lm (nothing from the Hugging Face hub). Override e.g. URL=... CONCURRENCY=...
URL ?= http://127.0.0.1:8000
MODEL ?= lm
CONCURRENCY ?= 8
REQUESTS ?= 200
MAX_TOKENS ?= 32
bench-aiperf: install bench-aiperf-venv
	$(BIN)/python -m bench.aiperf_prompts bench/results/aiperf/prompts.jsonl
	$(AIPERF_VENV)/bin/aiperf profile --url $(URL) --endpoint-type completions --streaming --model $(MODEL) \
		--tokenizer model/demo/lm --input-file bench/results/aiperf/prompts.jsonl --custom-dataset-type single_turn \
		--concurrency $(CONCURRENCY) --request-count $(REQUESTS) --output-tokens-mean $(MAX_TOKENS) \
		--extra-inputs temperature:0 --use-server-token-count --random-seed 0 --ui-type simple --no-gpu-telemetry \
		--artifact-dir bench/results/aiperf $(if $(API_KEY),--api-key $(API_KEY))

bench-single bench-concurrency bench-ttft bench-startup: install
	$(BIN)/pip install -q -c constraints.txt -e '.[$(ORT),dev,bench]'
	$(BIN)/python -m bench.targets $(subst bench-,,$@) --update-md

bench-targets: bench-single bench-concurrency bench-ttft bench-startup
