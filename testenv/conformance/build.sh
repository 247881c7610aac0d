#!/usr/bin/env bash
# Builds the Gateway API conformance suite (as a test binary) and its
# echo-basic backend from the module pinned in go.mod into OUT_DIR, once:
# binaries already there are kept. Each is published with one rename, so an
# interrupted build never leaves a truncated binary.
#
# Usage: build.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: build.sh OUT_DIR}
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if [ ! -x "$out/conformance.test" ]; then
  start=$(date +%s)
  CGO_ENABLED=0 go test -c -trimpath -o "$tmp/conformance.test" sigs.k8s.io/gateway-api/conformance
  mv "$tmp/conformance.test" "$out/conformance.test"
  echo "built conformance.test in $(( $(date +%s) - start ))s" >&2
fi
if [ ! -x "$out/echo-basic" ]; then
  start=$(date +%s)
  CGO_ENABLED=0 go build -trimpath -o "$tmp/echo-basic" sigs.k8s.io/gateway-api/conformance/echo-basic
  mv "$tmp/echo-basic" "$out/echo-basic"
  echo "built echo-basic in $(( $(date +%s) - start ))s" >&2
fi
