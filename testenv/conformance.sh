#!/usr/bin/env bash
# Runs the official Gateway API conformance suite (sigs.k8s.io/gateway-api
# v1.6.3, profile GATEWAY-HTTP) against Tandem's gateway on the local
# control plane. Builds what it needs (the suite and its echo-basic backend
# once, cached; tandem and testenv with cargo), starts the control plane
# with the process kubelet (echo-basic pods run the real echo-basic
# program), runs `tandem gateway` as the implementation of GatewayClass
# `tandem`, runs the suite, and prints the report's path last.
#
#   sudo testenv/conformance.sh [extra flags for the suite, e.g. -run-test=HTTPRouteWeight]
#
# Environment: TANDEM_CONFORMANCE_OUT (where the report and logs go;
# default a new folder under /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "$(id -u)" = 0 ] || { echo "needs root: pods live in a network namespace, Gateways listen on port 80 and 443" >&2; exit 1; }

cache_root=${TANDEM_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tandem}
cache="$cache_root/conformance/$(sha256sum testenv/conformance/go.sum | cut -c1-16)"
echo "--- the conformance suite and echo-basic (built once into $cache)" >&2
bash testenv/conformance/build.sh "$cache"

echo "--- tandem and testenv" >&2
cargo build --quiet -p tandem -p testenv
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
tools=$(bash testenv/tools/install-kube-tools.sh)
export PATH="$tools:$PATH"

out=${TANDEM_CONFORMANCE_OUT:-$(mktemp -d /tmp/tandem-conformance.XXXXXX)}
mkdir -p "$out"
export KUBECONFIG="$out/kubeconfig"
pids=()
teardown() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap teardown EXIT
trap 'exit 130' INT TERM

echo "--- control plane, kube-proxy and the process kubelet, with the Gateway API CRDs" >&2
"$target/debug/testenv" up --gateway-api \
  --own-network-image "registry.k8s.io/gateway-api/echo-basic=$cache/echo-basic" \
  --own-network-image "gcr.io/k8s-staging-gateway-api/echo-basic=$cache/echo-basic" \
  --kubeconfig-out "$KUBECONFIG" >"$out/up.out" 2>"$out/up.log" &
pids+=($!)
deadline=$((SECONDS + 1800))
until grep -q '^ready:' "$out/up.out" 2>/dev/null; do
  kill -0 "${pids[0]}" 2>/dev/null || { echo "testenv up failed:" >&2; tail -20 "$out/up.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "testenv up: not ready after 30 minutes" >&2; exit 1; }
  sleep 0.2
done

# Each Gateway gets an address of 127.0.10.0/24 (loopback: the suite, on
# this host, reaches it; the gateway reaches the pods through the pod
# network's routes).
kubectl apply --server-side -f crds/hybridapp.yaml >&2
echo "--- tandem gateway, controller tandem.dev/gateway" >&2
"$target/debug/tandem" gateway \
  --listen 127.0.0.1:0 --admin-address 127.0.0.1:0 \
  --gateway-controller-name tandem.dev/gateway \
  --gateway-addresses 127.0.10.0/24 \
  --gateway-status-lease default/tandem-gateway-status \
  --id conformance-gateway >"$out/gateway.log" 2>&1 &
pids+=($!)
sleep 1
kill -0 "${pids[1]}" 2>/dev/null || { echo "tandem gateway failed:" >&2; tail -20 "$out/gateway.log" >&2; exit 1; }

kubectl apply -f - >&2 <<'YAML'
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: tandem
spec:
  controllerName: tandem.dev/gateway
YAML

# The features claimed are those the gateway publishes in the class's
# status once it accepts it: the suite tests exactly what Tandem says.
features=
for _ in $(seq 1 300); do
  features=$(kubectl get gatewayclass tandem -o jsonpath='{.status.supportedFeatures[*].name}' 2>/dev/null || true)
  [ -n "$features" ] && break
  sleep 0.2
done
[ -n "$features" ] || { echo "GatewayClass tandem: no supportedFeatures in its status after 60s" >&2; tail -20 "$out/gateway.log" >&2; exit 1; }
features=$(echo "$features" | tr ' ' ',')
echo "--- supported features: $features" >&2

version=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print([p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="tandem"][0])')
echo "--- the suite (GATEWAY-HTTP); its log: $out/suite.log" >&2
start=$SECONDS
set +e
(cd "$out" && "$cache/conformance.test" -test.run '^TestConformance$' -test.v -test.timeout 60m \
  -gateway-class tandem \
  -conformance-profiles GATEWAY-HTTP \
  -supported-features "$features" \
  -organization tandem.dev -project tandem -url https://tandem.dev -version "v$version" -contact https://tandem.dev \
  -report-output "$out/report.yaml" "$@") >"$out/suite.log" 2>&1
status=$?
set -e
echo "suite finished in $((SECONDS - start))s with status $status" >&2
grep -E '^\s*(result|Passed|Failed|Skipped):' "$out/report.yaml" >&2 2>/dev/null || tail -30 "$out/suite.log" >&2
echo "$out/report.yaml"
exit $status
