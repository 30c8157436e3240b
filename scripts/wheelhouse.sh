#!/usr/bin/env bash
# The wheels one role's image installs (requirements/<role>.lock), built here with this machine's pip and its
# configured indexes, so that the image build itself needs no network (pip install --no-index inside the build).
# This is also how an air-gapped site builds: fill the wheelhouse where an index is reachable, carry it over.
#   usage: scripts/wheelhouse.sh ROLE [DIR]   (default DIR: build/wheelhouse/ROLE)
set -euo pipefail
cd "$(dirname "$0")/.."
role=${1:?usage: scripts/wheelhouse.sh ROLE [DIR]}
out=${2:-build/wheelhouse/$role}
pip=${PIP:-.venv/bin/pip}
lock=requirements/$role.lock
stamp=$out/.lock
if [ -f "$stamp" ] && cmp -s "$lock" "$stamp"; then
  echo "wheelhouse $out is up to date with $lock"; exit 0
fi
rm -rf "$out"
mkdir -p "$out"
# --no-deps: the lock is complete; pip wheel copies published wheels and builds the rest (sdists) here.
"$pip" wheel --quiet --no-deps --wheel-dir "$out" --requirement "$lock"
cp "$lock" "$stamp"
echo "wheelhouse $out: $(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1)"
