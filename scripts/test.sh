#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (warnings are errors), unit
# tests, and the end-to-end suites (root, eBPF, network namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests start the agent binary, so build it first.
cargo build -p fleetsnitch
cargo test --workspace -- --test-threads=1
