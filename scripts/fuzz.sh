#!/usr/bin/env bash
# Fuzzes the agent's DNS response parser (exporter/src/enrichment/dns/) with cargo-fuzz
# and libFuzzer for a bounded time, starting from the real dnsmasq responses
# in exporter/fuzz/seeds/.
#
# Installs what it needs, only when missing: a nightly toolchain (minimal
# profile; cargo-fuzz needs nightly for the sanitizer flags) and cargo-fuzz.
# A second run starts fuzzing within seconds.
#
#   scripts/fuzz.sh                      # 60 s of dns_response
#   FUZZ_SECONDS=600 scripts/fuzz.sh     # longer
#   scripts/fuzz.sh -jobs=2              # extra arguments go to libFuzzer
#
# New interesting inputs accumulate in exporter/fuzz/corpus/ (not committed);
# a crash is written to exporter/fuzz/artifacts/ and the script fails.
# Reproduce one with: cargo +nightly fuzz run dns_response ARTIFACT
# (in exporter/fuzz). The stable test exporter/tests/dns_mutations.rs checks
# the same invariants on mutated seeds in every CI run.
set -euo pipefail
cd "$(dirname "$0")/../exporter/fuzz"

seconds="${FUZZ_SECONDS:-60}"
target="${FUZZ_TARGET:-dns_response}"

if ! command -v rustup >/dev/null 2>&1; then
  echo "fuzz: rustup not found; it installs the nightly toolchain cargo-fuzz needs" >&2
  exit 1
fi
if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

mkdir -p "corpus/$target"
echo "fuzz: running $target for ${seconds}s" >&2
exec cargo +nightly fuzz run "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "$@"
