#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager and etcd from the pinned Go
# modules in go.mod into OUT_DIR, the way upstream builds its release binaries
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

build() {
  local name=$1 package=$2 ldflags=$3 start
  start=$(date +%s)
  CGO_ENABLED=0 go build -trimpath -tags grpcnotrace -ldflags "$ldflags" -o "$tmp/$name" "$package"
  echo "built $name in $(( $(date +%s) - start ))s" >&2
}

build etcd go.etcd.io/etcd/server/v3 "$etcd_ldflags"
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$k8s_ldflags"
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_ldflags"

# Publish all three at once, so an interrupted build never leaves a cache
# that looks complete.
mv "$tmp"/etcd "$tmp"/kube-apiserver "$tmp"/kube-controller-manager "$out"/
echo "${k8s_version} etcd ${etcd_version}" > "$out/VERSION"
