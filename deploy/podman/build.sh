#!/usr/bin/env bash
# Build the CPU image with podman on a host with no registry and no PyTorch index:
#   deploy/podman/build.sh [TAG]          (default localhost/gpt2-serve:cpu)
# The Dockerfile is used as it is; only build args and build-time mounts differ from a plain
# `docker build --target cpu .`:
#   PYTHON_IMAGE    the base made by base-image.sh (Debian bookworm, Python 3.11)
#   TORCH_PIP_ARGS  --find-links WHEELS: the local torch 2.13.0 CPU wheel instead of download.pytorch.org
# and two read-only mounts for the RUN steps: the wheel folder at /wheels, and this host's CA bundle
# over the image's (Debian's pip trusts the system bundle; pip's build-isolation subprocesses too,
# which a --cert flag would not reach), so pip reaches PyPI through this host's TLS proxy.
# --format docker keeps the HEALTHCHECK (the OCI image format has none).
# Environment: WHEELS (default /opt/wheels), CA (default /etc/ssl/certs/ca-certificates.crt),
# BASE_IMAGE (default localhost/python-bookworm), TARGET (default cpu).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
tag="${1:-localhost/gpt2-serve:cpu}"
wheels="${WHEELS:-/opt/wheels}"
ca="${CA:-/etc/ssl/certs/ca-certificates.crt}"
base="${BASE_IMAGE:-localhost/python-bookworm}"
"$here/base-image.sh" "$base"
ls "$wheels"/torch-2.13.0*.whl >/dev/null || { echo "no torch 2.13.0 wheel in $wheels" >&2; exit 1; }
start=$(date +%s)
"$here/podman.sh" build --network host --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  --format docker --target "${TARGET:-cpu}" -t "$tag" \
  --build-arg PYTHON_IMAGE="$base" \
  --build-arg TORCH_PIP_ARGS="--find-links /wheels" \
  -v "$wheels:/wheels:ro" -v "$ca:/etc/ssl/certs/ca-certificates.crt:ro" \
  -f "$repo/Dockerfile" "$repo"
echo "built $tag in $(( $(date +%s) - start )) s"
# vfs storage copies every layer in full (about 1.4 GB a step here): drop the images that earlier
# builds of this tag (and of the base) left untagged, so repeated builds (CI) do not fill the disk.
"$here/podman.sh" image prune -f >/dev/null || echo "podman image prune failed (disk use may grow)" >&2
