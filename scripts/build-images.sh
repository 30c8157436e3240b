#!/usr/bin/env bash
# `make images`: the predictor and bridge images, built offline. Each role's locked wheels are fetched into a
# wheelhouse by this machine's pip (scripts/wheelhouse.sh) and installed in the build with --no-index; the base
# is $BASE_IMAGE or, when unset, a Debian bookworm + Python 3.11 image made here by mmdebstrap
# (scripts/build-base-image.sh). Podman is preferred when present (the project's docker/containers.conf applies),
# else docker (BuildKit, for the named "wheels" build context).
#   usage: scripts/build-images.sh PREDICTOR_IMAGE BRIDGE_IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."
predictor=${1:?usage: scripts/build-images.sh PREDICTOR_IMAGE BRIDGE_IMAGE}
bridge=${2:?usage: scripts/build-images.sh PREDICTOR_IMAGE BRIDGE_IMAGE}
if command -v podman >/dev/null; then
  engine=podman
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
  pull=(--pull=never --format=docker)  # docker format: keeps HEALTHCHECK
else
  engine=docker
  pull=()
fi
if [ -z "${BASE_IMAGE:-}" ]; then
  BASE_IMAGE=localhost/kcp-base:bookworm
  bash scripts/build-base-image.sh "$BASE_IMAGE"
fi
build() {  # role dockerfile image
  bash scripts/wheelhouse.sh "$1"
  local start=$SECONDS
  "$engine" build "${pull[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" --build-context wheels="build/wheelhouse/$1" \
    -f "$2" -t "$3" .
  echo "built $3 in $((SECONDS - start)) s"
}
build serve docker/Dockerfile.predictor "$predictor"
build bridge docker/Dockerfile.bridge "$bridge"
"$engine" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e "$predictor" -e "$bridge"
