#!/usr/bin/env bash
# Builds the health helper (kstatus and Argo CD's Lua health, see main.go)
# once per version of its sources into the testenv cache, and prints the
# binary's path. Published with one rename, so an interrupted build never
# leaves a truncated binary.
#
# Usage: build.sh
set -euo pipefail
cd "$(dirname "$0")"
cache_root=${TANDEM_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
out="$cache_root/health/$(cat go.sum main.go | sha256sum | cut -c1-16)"
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if [ ! -x "$out/health" ]; then
  tmp=$(mktemp -d "$out/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  start=$(date +%s)
  CGO_ENABLED=0 go build -trimpath -o "$tmp/health" .
  mv "$tmp/health" "$out/health"
  echo "built the health helper in $(( $(date +%s) - start ))s" >&2
fi
echo "$out/health"
