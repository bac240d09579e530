#!/usr/bin/env bash
# Runs the overhead and footprint benchmarks against a release build of the
# agent and prints a table: figure, measured, target, verdict. Needs root.
# Arguments go to the runner (tests/src/bin/bench.rs), e.g. --rounds 9 or
# --only overhead|footprint|scrape|fleet, --hosts 100,1000. Exits 2 when a
# figure misses its target.
# Run it on a quiet machine: every figure is a ratio against a baseline in the
# same run, but a busy neighbour still widens the spread.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p fleetsnitch -p fleetsnitch-e2e --bin fleetsnitch --bin bench --bin connector --bin trafficgen
FLEETSNITCH_BIN="$PWD/target/release/fleetsnitch" exec target/release/bench "$@"
