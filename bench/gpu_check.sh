#!/usr/bin/env bash
# The one prepared GPU check (issue 22): the `cuda` tests, then `python -m bench.gpu` against
# transformers fp16 on the same GPU, with the GPU's name and versions, all written under OUT.
#
#   bash bench/gpu_check.sh OUT
#
# On the lent GPU machine (../shared/gpu/README.md): stage onnxruntime-gpu first, then one call
#   . .device/base/setup.sh && bash bench/gpu_check.sh $OUT
# ../shared/gpu/stage-wheels.sh (2026-12-04) does not stage httptools and orjson, which the server
# imports (the H200 run found the server test failing on httptools). Add them to .device/base/whl first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .device/base/whl httptools==0.9.0 orjson==3.13.0      (the constraints.txt versions)
# Sized for a 15-minute lease that includes the machine's start: the tests get 4 minutes, the
# benchmark 5 (2 rounds, the fp16 systems the targets name, 8 s closed loops); TESTS_TIMEOUT and
# BENCH_TIMEOUT (seconds) shorten either when less of the lease is left. Both run even if
# the first fails; the exit status is the tests'. Nothing here needs the network.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
  $PY -c "import onnxruntime as o, torch; print('onnxruntime', o.__version__, o.get_available_providers()); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

timeout "${TESTS_TIMEOUT:-240}" $PY -m pytest -m cuda -q -rA -p no:cacheprovider tests/app/engine/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
tests=${PIPESTATUS[0]}

timeout "${BENCH_TIMEOUT:-300}" $PY -m bench.gpu --systems hf-fp16,ort-fp16 --repeats 2 --per-round 3 --steps 30 --duration 8 \
  --out "$OUT/gpu_cuda.json" 2>&1 | tee "$OUT/bench_gpu.log"
echo "gpu_check: tests exit $tests, bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu.txt"
exit "$tests"
