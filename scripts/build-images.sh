#!/usr/bin/env bash
# `make images`: the predictor and bridge images, built offline. Each role's locked wheels are fetched into a
# wheelhouse by this machine's pip (scripts/wheelhouse.sh) and installed in the build with --no-index; the base
# is $BASE_IMAGE (and $BUILD_IMAGE, the same with binutils, for the predictor's build stage) or, when unset, a
# Debian bookworm + Python 3.11 image made here by mmdebstrap (scripts/build-base-image.sh), and one with binutils. Podman is preferred when present (the project's docker/containers.conf applies),
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
  BASE_IMAGE=localhost/kcp-base:bookworm BUILD_IMAGE=localhost/kcp-build:bookworm
  bash scripts/build-base-image.sh "$BASE_IMAGE"
  bash scripts/build-base-image.sh "$BUILD_IMAGE" binutils
fi
build() {  # role dockerfile image [build args...]
  bash scripts/wheelhouse.sh "$1"
  local start=$SECONDS
  "$engine" build "${pull[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" "${@:4}" \
    --build-context wheels="build/wheelhouse/$1" -f "$2" -t "$3" .
  echo "built $3 in $((SECONDS - start)) s"
}
build serve docker/Dockerfile.predictor "$predictor" ${BUILD_IMAGE:+--build-arg BUILD_IMAGE="$BUILD_IMAGE"}
build bridge docker/Dockerfile.bridge "$bridge"
"$engine" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F -e "$predictor" -e "$bridge"
