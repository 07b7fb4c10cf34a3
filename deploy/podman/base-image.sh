#!/usr/bin/env bash
# Build the Python base image from Debian packages, for hosts with no container registry:
#   deploy/podman/base-image.sh [IMAGE]        (default localhost/python-bookworm)
# debootstrap's minbase bookworm plus python3, venv and pip (Python 3.11, as python:3.11-slim),
# imported as IMAGE. Then build with --build-arg PYTHON_IMAGE=IMAGE (deploy/podman/build.sh does).
# Needs root and the Debian packages debootstrap and podman. MIRROR defaults to the first
# deb.debian.org-style URI apt uses here. Does nothing when IMAGE already exists (FORCE=1 rebuilds).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-localhost/python-bookworm}"
if [ -z "${FORCE:-}" ] && "$here/podman.sh" image exists "$image"; then
  echo "base image $image exists"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap not found: apt-get install debootstrap" >&2; exit 1; }
mirror="${MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | awk '{print $2}' | head -1 || true)}"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/python-bookworm.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror into $root"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
  bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
chmod 755 "$root"  # mktemp made it 0700: the image's / would be closed to non-root users
tar -C "$root" -c . | "$here/podman.sh" import --change 'CMD ["python3"]' - "$image"
echo "imported $image"
