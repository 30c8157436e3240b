#!/usr/bin/env bash
# Extract promtool and the Prometheus server from Debian's prometheus package into .tools/bin/ without
# installing the package (which would also install and start a Prometheus service). promtool checks and
# unit-tests the alert rules and evaluates the dashboard's PromQL; the server scrapes a live model server and
# bridge in tests/test_prometheus_live.py. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${TOOLS_DIR:-$ROOT/.tools}/bin"
if [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1 \
   && [ -x "$BIN/prometheus" ] && "$BIN/prometheus" --version >/dev/null 2>&1; then
  exit 0
fi
mkdir -p "$BIN"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null; }
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/promtool "$BIN/promtool"
install -m 0755 root/usr/bin/prometheus "$BIN/prometheus"
echo "promtool: $("$BIN/promtool" --version 2>&1 | head -1)"
echo "prometheus: $("$BIN/prometheus" --version 2>&1 | head -1)"
