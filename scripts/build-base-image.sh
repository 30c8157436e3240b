#!/usr/bin/env bash
# The images' base without a registry: a minimal Debian bookworm with Python 3.11 built by mmdebstrap from this
# machine's own apt sources (whatever mirror or proxy they name), imported as a local image. The Dockerfiles take
# it as --build-arg BASE_IMAGE=...; with a registry at hand, python:3.11-slim-bookworm serves the same purpose.
# Extra Debian packages after the name make a build image (the predictor's build stage strips TensorFlow's
# libraries with binutils, which the runtime image does not carry).
#   usage: scripts/build-base-image.sh [IMAGE [PACKAGE...]]   (default localhost/kcp-base:bookworm; kept if present)
set -euo pipefail
image=${1:-localhost/kcp-base:bookworm}
extra=("${@:2}")
include=python3,python3-venv,python-is-python3,passwd,libstdc++6,ca-certificates,tzdata$(printf ',%s' "${extra[@]}")
engine=$(command -v podman || command -v docker)
if "$engine" image inspect "$image" >/dev/null 2>&1; then
  echo "base image $image present"; exit 0
fi
sources=()
[ -s /etc/apt/sources.list ] && sources+=(/etc/apt/sources.list)
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -s "$f" ] && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || { echo "no apt sources configured in /etc/apt" >&2; exit 1; }
tarball=$(mktemp --suffix=.tar)
trap 'rm -f "$tarball"' EXIT
# The essential variant: Debian's Essential packages and what --include needs, without apt (nothing installs
# packages into the images; Python's come from the wheelhouse) or the rest of Priority: required (mount,
# e2fsprogs, adduser). python-is-python3: `python` on PATH as in the python:* images; python3-venv: the images'
# /opt/venv; passwd: groupadd and useradd for the images' user; libstdc++6: the C++ runtime that manylinux wheels
# (onnxruntime, grpcio, scipy) link against; ca-certificates and tzdata as in the python:* images.
# The merged-usr hook makes merged /usr with symlinks as debootstrap does (else the usrmerge package drags in
# perl). Docs, man pages, locales and apt's lists stay out: no container reads them. So do glibc's iconv modules
# (gconv): Python's codecs are its own, and glibc has UTF-8, UTF-16/32 and ASCII built in.
mmdebstrap --variant=essential --include="${include%,}" --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/lib/x86_64-linux-gnu/gconv/*' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
  bookworm "$tarball" "${sources[@]}"
"$engine" import --change 'CMD ["python3"]' "$tarball" "$image"
echo "base image $image built"
