#!/usr/bin/env bash
# CI's container stage (`make container-test`, after `make test`): install podman and friends if missing, build
# both images offline (scripts/build-images.sh), run them as the chart does (tests/containers/), print their
# sizes and how long the stage took.
#   usage: scripts/container-test.sh PREDICTOR_IMAGE BRIDGE_IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
# runc, not crun (crun refuses cgroups in hybrid mode); mmdebstrap builds the base image from the apt sources.
packages=(podman buildah runc mmdebstrap)
missing=$(for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
if [ -n "$missing" ]; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
export KCP_PREDICTOR_IMAGE=$1 KCP_BRIDGE_IMAGE=$2
bash scripts/build-images.sh "$KCP_PREDICTOR_IMAGE" "$KCP_BRIDGE_IMAGE"
built=$SECONDS
.venv/bin/python -m pytest -q -m container tests/containers
echo "image sizes:"
podman image inspect --format '{{.Size}} {{index .RepoTags 0}}' "$KCP_PREDICTOR_IMAGE" "$KCP_BRIDGE_IMAGE" |
  awk '{printf "  %-60s %4d MB\n", $2, $1 / 1e6}'
echo "container stage: $((SECONDS - start)) s (images $((built - start)) s, tests $((SECONDS - built)) s)"
