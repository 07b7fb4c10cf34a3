#!/usr/bin/env bash
# podman as it runs on this kind of host (root, no systemd, no overlay): vfs storage, cgroupfs, runc.
# Every script here calls podman through this wrapper; PODMAN_ARGS replaces the global flags.
set -euo pipefail
# shellcheck disable=SC2086
exec podman ${PODMAN_ARGS:---storage-driver vfs --cgroup-manager=cgroupfs --runtime runc} "$@"
