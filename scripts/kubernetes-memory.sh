#!/usr/bin/env bash
# Memory of a running agent with its pod index loaded (README, "The pods of the
# node"): starts scripts/kubernetes-standin.py with PODS pods, the agent BINARY
# against it, and prints the Kubernetes counters (and fleetsnitch_kubernetes_api_up where
# the agent exports it) and VmRSS/VmHWM after 25 s.
# Needs root (the agent loads its eBPF programs). Usage:
#   scripts/kubernetes-memory.sh target/release/fleetsnitch 300 [PORT]
set -euo pipefail
bin=$(realpath "$1"); pods=$2; port=${3:-18080}; web=$((port + 1))
here=$(dirname "$(realpath "$0")")
dir=$(mktemp -d)
trap 'kill "$agent" "$api" 2>/dev/null || true; wait 2>/dev/null; rm -rf "$dir"' EXIT
echo test-token >"$dir/token"
python3 "$here/kubernetes-standin.py" "$port" "$pods" 2>"$dir/api.log" &
api=$!
sleep 1
cat >"$dir/fleetsnitch.yaml" <<EOC
kubernetes:
  token_path: $dir/token
  ca_path: $dir/no-ca.crt
  api_url: http://127.0.0.1:$port
  node_name: node-a
EOC
"$bin" --config.file "$dir/fleetsnitch.yaml" --journal.path "$dir/journal.db" \
  --web.listen-address "127.0.0.1:$web" >"$dir/agent.log" 2>&1 &
agent=$!
sleep 25
curl -s "127.0.0.1:$web/metrics" | grep -E '^fleetsnitch_kubernetes_((lists|list_errors|watches|watch_errors)_total|api_up) ' | tr '\n' ' '
echo
grep -E 'VmRSS|VmHWM' "/proc/$agent/status" | tr -s ' \t' ' ' | tr '\n' ' '
echo
