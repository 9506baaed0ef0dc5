#!/usr/bin/env bash
# make image: build the image (default sdft:local) on a machine whose Docker engine may have no
# registry access and whose builds cannot verify TLS.
#  - base: the Dockerfile's pinned CUDA base when it is present or can be pulled; otherwise a Debian
#    bookworm base (python3.11 in apt) made here with debootstrap + docker import. BASE_IMAGE=…
#    picks one explicitly.
#  - Python dependencies: from a wheelhouse the host fills with docker/lock.py --wheelhouse
#    (pip download --require-hashes for the image's platform); the build installs it --no-index,
#    hashes checked again.
# Everything it makes lives in .work/image/ and is reused when present.
# Usage: scripts/build-image.sh  (env: IMAGE, BASE_IMAGE, PYTHON, DOCKER)
set -euo pipefail
cd "$(dirname "$0")/.."

image="${IMAGE:-sdft:local}"
python="${PYTHON:-.venv/bin/python}"
work=.work/image
local_base=sdft-base:bookworm

# A docker client that builds with BuildKit (RUN --mount): one with the buildx plugin, or a
# pre-23 client, whose BuildKit is built in (Debian's docker.io 20.10 at /usr/bin/docker).
buildkit_client() {
  local client major
  for client in ${DOCKER:-docker /usr/bin/docker}; do
    command -v "$client" >/dev/null || continue
    if "$client" buildx version >/dev/null 2>&1; then echo "$client"; return; fi
    major="$("$client" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)"
    if [[ "$major" =~ ^[0-9]+$ ]] && (( major < 23 )); then echo "$client"; return; fi
  done
  echo "no docker client with BuildKit: install the buildx plugin or Debian's docker.io" >&2
  return 1
}
docker="$(buildkit_client)"

# The local base: debootstrap's minimal bookworm (its default Debian mirror, plain apt over http).
make_local_base() {
  if "$docker" image inspect "$local_base" >/dev/null 2>&1; then return; fi
  if [[ ! -x "$work/rootfs/usr/bin/apt-get" ]]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is needed for the local base (apt-get install debootstrap)" >&2; exit 1; }
    rm -rf "$work/rootfs.partial"
    mkdir -p "$work"
    debootstrap --variant=minbase bookworm "$work/rootfs.partial" >"$work/debootstrap.log"
    mv "$work/rootfs.partial" "$work/rootfs"
  fi
  tar -C "$work/rootfs" -c . | "$docker" import - "$local_base" >/dev/null
}

default_base="$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)"
if [[ -n "${BASE_IMAGE:-}" ]]; then
  base="$BASE_IMAGE"
elif "$docker" image inspect "$default_base" >/dev/null 2>&1 || timeout 300 "$docker" pull --quiet "$default_base" >/dev/null 2>&1; then
  base="$default_base"
else
  echo "the CUDA base cannot be pulled: using a local Debian bookworm base ($local_base)" >&2
  make_local_base
  base="$local_base"
fi

"$python" docker/lock.py --wheelhouse "$work/wheels"

# --network host: the engine may run with --bridge=none; apt-get in the build needs a network.
DOCKER_BUILDKIT=1 "$docker" build --network host \
  --build-arg BASE_IMAGE="$base" \
  --build-arg DEPS=wheelhouse \
  --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  --tag "$image" .
