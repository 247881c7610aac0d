#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-proxy and etcd from the
# pinned Go modules in go.mod into OUT_DIR (those not there yet), the way upstream builds its release binaries
# (grpcnotrace tag, stripped, version stamped so /version is right).
#
# Usage: build.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")"
out=${1:?usage: build.sh OUT_DIR}

k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' go.mod)
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' go.mod)
minor=$(echo "$k8s_version" | cut -d. -f2)

mkdir -p "$out"
tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

k8s_ldflags="-s -w -X k8s.io/component-base/version.gitVersion=${k8s_version} -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${minor} -X k8s.io/component-base/version.gitTreeState=clean"
etcd_ldflags="-s -w"

# Each binary is published with one rename once built, so an interrupted
# build never leaves a truncated binary, and VERSION (what marks the cache
# complete) is written last.
build() {
  local name=$1 package=$2 ldflags=$3 start
  [ -x "$out/$name" ] && return
  start=$(date +%s)
  CGO_ENABLED=0 go build -trimpath -tags grpcnotrace -ldflags "$ldflags" -o "$tmp/$name" "$package"
  mv "$tmp/$name" "$out/$name"
  echo "built $name in $(( $(date +%s) - start ))s" >&2
}

build etcd go.etcd.io/etcd/server/v3 "$etcd_ldflags"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"
build kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$k8s_ldflags"

echo "${k8s_version} etcd ${etcd_version}" > "$out/VERSION"
