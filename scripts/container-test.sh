#!/usr/bin/env bash
# CI's container stage (`make container-test`, after `make test`): install podman and friends if missing, build
# the images offline (scripts/build-images.sh), run them as the chart does (tests/containers/), print their sizes,
# hold the scikit-learn runtime image to its size budget and say how long the stage took.
# $IMAGES narrows the stage to some images (e.g. IMAGES=sklearn): only their tests run.
#   usage: scripts/container-test.sh PREDICTOR_IMAGE BRIDGE_IMAGE SKLEARN_IMAGE
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
usage="usage: scripts/container-test.sh PREDICTOR_IMAGE BRIDGE_IMAGE SKLEARN_IMAGE"
export KCP_PREDICTOR_IMAGE=${1:?$usage} KCP_BRIDGE_IMAGE=${2:?$usage} KCP_SKLEARN_IMAGE=${3:?$usage}
images=${IMAGES:-predictor bridge sklearn}
bash scripts/build-images.sh "$KCP_PREDICTOR_IMAGE" "$KCP_BRIDGE_IMAGE" "$KCP_SKLEARN_IMAGE"
built=$SECONDS
# The predictor's tests (with the bridge's, which run against it) need the predictor and bridge images; the
# scikit-learn runtime's its own.
tests=()
[[ " $images " == *" predictor "* && " $images " == *" bridge "* ]] && tests+=(tests/containers/test_images.py)
[[ " $images " == *" sklearn "* ]] && tests+=(tests/containers/test_sklearn_image.py)
if [ ${#tests[@]} -gt 0 ]; then
  .venv/bin/python -m pytest -q -m container "${tests[@]}"
fi
tested=$SECONDS
echo "image sizes (uncompressed, as stored here):"
names=()
for role in $images; do
  var=KCP_${role^^}_IMAGE
  names+=("${!var}")
done
podman image inspect --format '{{.Size}} {{index .RepoTags 0}}' "${names[@]}" |
  awk '{printf "  %-60s %4d MB\n", $2, $1 / 1e6}'
if [[ " $images " == *" sklearn "* ]]; then
  # The budget of the scikit-learn runtime (a model of that format should not pull TensorFlow's weight), held on
  # the uncompressed size, what `podman images` shows; the gzip size (the image's layers compressed as a registry
  # stores them, what a node downloads) is printed beside it.
  budget_mb=${SKLEARN_IMAGE_MAX_MB:-460}
  size_mb=$(($(podman image inspect --format '{{.Size}}' "$KCP_SKLEARN_IMAGE") / 1000000))
  pulled_mb=$(($(podman save --format docker-archive "$KCP_SKLEARN_IMAGE" | gzip -6 | wc -c) / 1000000))
  echo "  $KCP_SKLEARN_IMAGE: $size_mb MB uncompressed (budget $budget_mb MB), $pulled_mb MB gzip"
  if [ "$size_mb" -gt "$budget_mb" ]; then
    echo "the scikit-learn runtime image is over its budget: $size_mb MB > $budget_mb MB uncompressed" >&2
    exit 1
  fi
fi
echo "container stage: $((SECONDS - start)) s (images $((built - start)) s, tests $((tested - built)) s)"
