#!/usr/bin/env bash
# Runs every check and test: formatting, clippy (warnings are errors), a short
# fuzz run of the DNS parser, unit tests, and the end-to-end suites (root, eBPF,
# network namespaces, real Prometheus, Alertmanager, dnsmasq and OTLP
# collector, and the kernel matrix under qemu).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The Helm chart, rendered with Helm's template stack and checked against the
# Kubernetes schemas (no helm binary exists here; see README).
helm/fleetsnitch/ci/check.sh
# The image without a container engine: hadolint, OCI labels, the build context.
docker/check.sh
# A short cargo-fuzz run of the DNS parser (longer runs: FUZZ_SECONDS=600 scripts/fuzz.sh).
FUZZ_SECONDS="${FUZZ_SECONDS:-30}" scripts/fuzz.sh
# The end-to-end tests start the agent binary, so build it first.
cargo build -p fleetsnitch
# The systemd unit: systemd-analyze verify and security, then the agent started by
# it under a real systemd (PID 1 of a systemd-nspawn container; init here is not systemd).
exporter/systemd/check.sh
cargo test --workspace -- --test-threads=1
