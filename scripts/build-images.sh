#!/usr/bin/env bash
# `make images`: the predictor, bridge and scikit-learn runtime images, built offline. Each role's locked wheels are
# fetched into a wheelhouse by this machine's pip (scripts/wheelhouse.sh) and installed in the build with
# --no-index; the base is $BASE_IMAGE (and $BUILD_IMAGE, the same with binutils, for the build stages of the
# predictor and the scikit-learn runtime, which strip their shared objects)
# or, when unset, a Debian bookworm + Python 3.11 image made here by mmdebstrap (scripts/build-base-image.sh), and
# one with binutils. Podman is preferred when present (the project's docker/containers.conf applies), else docker
# (BuildKit, for the named "wheels" build context). $IMAGES picks some of them (default: "predictor bridge sklearn").
#   usage: scripts/build-images.sh PREDICTOR_IMAGE BRIDGE_IMAGE SKLEARN_IMAGE
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: scripts/build-images.sh PREDICTOR_IMAGE BRIDGE_IMAGE SKLEARN_IMAGE"
predictor=${1:?$usage}
bridge=${2:?$usage}
sklearn=${3:?$usage}
images=${IMAGES:-predictor bridge sklearn}
for wanted in $images; do
  case $wanted in predictor|bridge|sklearn) ;; *) echo "IMAGES: $wanted is not predictor, bridge or sklearn" >&2; exit 2 ;; esac
done
wants() { [[ " $images " == *" $1 "* ]]; }
if command -v podman >/dev/null; then
  engine=podman
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/docker/containers.conf}
  pull=(--pull=never --format=docker)  # docker format: keeps HEALTHCHECK
else
  engine=docker
  pull=()
fi
if [ -z "${BASE_IMAGE:-}" ]; then
  # Tagged with the script's checksum: a base is kept while present, so an edited script must make a new one.
  tag=bookworm-$(cksum < scripts/build-base-image.sh | cut -d' ' -f1)
  BASE_IMAGE=localhost/kcp-base:$tag
  bash scripts/build-base-image.sh "$BASE_IMAGE"
  if wants predictor || wants sklearn; then
    BUILD_IMAGE=localhost/kcp-build:$tag
    bash scripts/build-base-image.sh "$BUILD_IMAGE" binutils
  fi
fi
build() {  # role dockerfile image [build args...]
  bash scripts/wheelhouse.sh "$1"
  local start=$SECONDS
  "$engine" build "${pull[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" "${@:4}" \
    --build-context wheels="build/wheelhouse/$1" -f "$2" -t "$3" .
  echo "built $3 in $((SECONDS - start)) s"
}
built=()
if wants predictor; then
  build serve docker/Dockerfile.predictor "$predictor" ${BUILD_IMAGE:+--build-arg BUILD_IMAGE="$BUILD_IMAGE"}
  built+=("$predictor")
fi
if wants bridge; then
  build bridge docker/Dockerfile.bridge "$bridge"
  built+=("$bridge")
fi
if wants sklearn; then
  build serve-sklearn docker/Dockerfile.sklearn "$sklearn" ${BUILD_IMAGE:+--build-arg BUILD_IMAGE="$BUILD_IMAGE"}
  built+=("$sklearn")
fi
"$engine" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -F "${built[@]/#/-e}"
