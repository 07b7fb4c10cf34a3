# syntax=docker/dockerfile:1.7
# gpt2-serve. CPU image (default):   docker build -t gpt2-serve .
#             CUDA image:            docker build --target gpu -t gpt2-serve:gpu .
# The demo models' ONNX exports are baked in at build time, so a container is healthy within
# seconds. Mount a checkpoint at /models and set MODEL_PATH to serve your own; its export is
# cached in ONNX_CACHE_DIR (a volume in docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm
# The CUDA major is pinned once, here. onnxruntime-gpu (its pin is in constraints.txt) is built for it:
# 1.31's CUDA provider links libcublas.so.13, libcudart.so.13 and cuDNN 9. The base image and torch's
# CUDA build follow it, the gpu stage checks at build time that the provider's libraries resolve, and
# tests/deploy/test_docker_consistency.py keeps these lines, constraints.txt and docs/DEPLOY.md in step.
ARG CUDA_MAJOR=13
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu130

# ---- build the CPU virtualenv -------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder-cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the CPU index: the default PyPI wheel drags in several GB of CUDA libraries.
# TORCH_PIP_ARGS says where the CPU wheel comes from; PIP_EXTRA_ARGS goes to both pip installs.
# Offline/air-gapped builds replace them, e.g. --build-arg TORCH_PIP_ARGS="--find-links /wheels"
# with a folder holding the torch 2.13.0 CPU wheel mounted at build time (deploy/podman/build.sh).
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG PIP_EXTRA_ARGS=""
RUN pip install ${PIP_EXTRA_ARGS} torch==2.13.0 ${TORCH_PIP_ARGS}
COPY pyproject.toml README.md constraints.txt ./
COPY model ./model
COPY export ./export
COPY app ./app
RUN pip install ${PIP_EXTRA_ARGS} -c constraints.txt '.[cpu]'

# ---- the CPU runtime image --------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app app \
    && mkdir -p /app /models /cache && chown app:app /app /models /cache
COPY --from=builder-cpu /opt/venv /opt/venv
COPY --chown=app:app model/demo /app/model/demo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL_PATH=/app/model/demo/lm \
    CLASSIFIER_PATH=/app/model/demo/classifier \
    BACKEND=auto \
    DEVICE=auto \
    PRECISION=fp32 \
    ONNX_CACHE_DIR=/cache \
    HOST=0.0.0.0 \
    PORT=8000 \
    MAX_INPUT_TOKENS=512 \
    MAX_TOTAL_TOKENS=1024 \
    MAX_BATCH_SIZE=32 \
    MAX_CONCURRENT_REQUESTS=128 \
    SHUTDOWN_GRACE_SECONDS=30 \
    LOG_LEVEL=INFO
WORKDIR /app
USER app
# Bake the demo exports into the image's cache (a fresh named volume is seeded from it).
RUN python -m app.prepare
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]

# ---- the CUDA image ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu
ARG CUDA_MAJOR
ARG TORCH_CUDA_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch's CUDA build for export and the PyTorch fallback; the same CUDA major as onnxruntime-gpu.
RUN pip install torch==2.13.0 --index-url ${TORCH_CUDA_INDEX_URL}
COPY pyproject.toml README.md constraints.txt ./
COPY model ./model
COPY export ./export
COPY app ./app
RUN pip install -c constraints.txt '.[gpu]'
# Fail the build, not the first start, if ONNX Runtime's CUDA provider cannot find its CUDA
# libraries in this image (libcuda.so.1 is the driver's, mounted at run time by the NVIDIA toolkit).
RUN so=$(python -c "import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / 'capi' / 'libonnxruntime_providers_cuda.so')") \
    && ldd "$so" | grep -q "libcublas.so.${CUDA_MAJOR}" \
    && ! ldd "$so" | grep "not found" | grep -v "libcuda.so"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --home-dir /app app \
    && mkdir -p /app /models /cache && chown app:app /app /models /cache
COPY --chown=app:app model/demo /app/model/demo
ENV PYTHONUNBUFFERED=1 \
    MODEL_PATH=/app/model/demo/lm \
    CLASSIFIER_PATH=/app/model/demo/classifier \
    BACKEND=auto \
    DEVICE=auto \
    PRECISION=auto \
    ONNX_CACHE_DIR=/cache \
    HOST=0.0.0.0 \
    PORT=8000 \
    MAX_INPUT_TOKENS=512 \
    MAX_TOTAL_TOKENS=1024 \
    MAX_BATCH_SIZE=32 \
    MAX_CONCURRENT_REQUESTS=128 \
    SHUTDOWN_GRACE_SECONDS=30 \
    LOG_LEVEL=INFO
WORKDIR /app
USER app
# No GPU at build time: the exports (fp16 on CUDA with PRECISION=auto) are made and verified on the
# GPU at first start, into the /cache volume.
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
