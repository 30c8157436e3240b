#!/usr/bin/env bash
# Extract promtool from Debian's prometheus package into .tools/bin/ without installing the
# package (which would also install a Prometheus service). Used by the dashboard test, which
# evaluates the Grafana queries with Prometheus's own engine. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${TOOLS_DIR:-$ROOT/.tools}/bin"
[ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1 && exit 0
mkdir -p "$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/promtool "$BIN/promtool"
echo "promtool: $("$BIN/promtool" --version 2>&1 | head -1)"
