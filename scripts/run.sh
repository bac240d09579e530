#!/usr/bin/env bash
# Builds and runs the agent with defaults: /metrics on [::]:9941, journal
# under /var/lib/fleetsnitch. Extra arguments go to the agent, e.g.
#   scripts/run.sh --web.listen-address 127.0.0.1:9941
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p fleetsnitch
exec target/release/fleetsnitch "$@"
