#!/usr/bin/env bash
# Checks exporter/systemd/fleetsnitch.service:
# 1. `systemd-analyze verify` in a scratch root holding the unit, the agent binary
#    and kill: exit 0 and not one message (verify only warns, exit 0, on unknown
#    keys, bad values or system call names).
# 2. `systemd-analyze security --offline`: the exposure level stays at or below
#    FSN_SYSTEMD_EXPOSURE (44, i.e. 4.4): dropping a hardening option fails.
# 3. The unit run by a real systemd under its own sandboxing. This machine's init is
#    not systemd, so systemd boots as PID 1 of a systemd-nspawn container (a Debian
#    root made once by mmdebstrap, cached in .cache/systemd-check; changes go to
#    an overlay that is thrown away), with the agent binary and the unit bound in.
#    nspawn's own seccomp filter would refuse bpf() and the rest, so exactly the
#    calls the unit adds to @system-service are allowed through it. Asserts: the
#    service starts and /healthz answers; its process runs under a seccomp filter
#    with no_new_privs and a bounding set inside the unit's; the probes attach;
#    bytes of a program are counted; a program run from /tmp is hashed and its
#    in-place modification noticed; `systemctl reload` sends SIGHUP to the same
#    process, which re-reads its web configuration; without a web configuration a
#    reload leaves the service running; `systemctl stop` ends it cleanly.
# Needs root, systemd (systemd-analyze), systemd-container (systemd-nspawn) and
# mmdebstrap (scripts/setup.sh installs them) and the agent built
# (FSN_AGENT, default target/debug/fleetsnitch).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
unit="$repo/exporter/systemd/fleetsnitch.service"
agent="${FSN_AGENT:-$repo/target/debug/fleetsnitch}"
work="${FSN_SYSTEMD_CHECK_DIR:-$repo/.cache/systemd-check}"
threshold="${FSN_SYSTEMD_EXPOSURE:-44}"
[ -x "$agent" ] || { echo "systemd check: no agent binary at $agent (cargo build -p fleetsnitch)" >&2; exit 1; }
mkdir -p "$work"
fail() { echo "systemd check: FAILED: $*" >&2; exit 1; }

# 1. verify, in a root where ExecStart, ExecReload and the default targets resolve.
scratch="$work/verify-root"
rm -rf "$scratch"
mkdir -p "$scratch/usr/local/bin" "$scratch/usr/bin" "$scratch/usr/lib/systemd" "$scratch/etc/systemd/system"
ln -s usr/bin "$scratch/bin"
cp -a /usr/lib/systemd/system "$scratch/usr/lib/systemd/"
cp "$agent" "$scratch/usr/local/bin/fleetsnitch"
cp "$(type -P kill)" "$scratch/usr/bin/kill"
cp "$unit" "$scratch/etc/systemd/system/"
if ! messages="$(systemd-analyze verify --root="$scratch" fleetsnitch.service 2>&1)" || [ -n "$messages" ]; then
  fail "systemd-analyze verify: ${messages:-non-zero exit}"
fi
echo "systemd check: systemd-analyze verify: no message"

# 2. exposure.
exposure="$(systemd-analyze security --offline=true --root="$scratch" --threshold="$threshold" fleetsnitch.service 2>&1 | grep 'Overall exposure')" ||
  fail "systemd-analyze security: exposure above $threshold/100: $(systemd-analyze security --offline=true --root="$scratch" fleetsnitch.service 2>&1 | grep 'Overall exposure')"
echo "systemd check: $exposure (threshold $threshold/100)"

# 3. a real systemd.
. /etc/os-release
rootfs="$work/root-$VERSION_CODENAME"
# procps: /bin/kill of ExecReload (priority "important": on every Debian host).
packages=systemd,systemd-sysv,dbus,procps,curl,ca-certificates
if [ "$(cat "$rootfs/.fleetsnitch-check" 2> /dev/null)" != "$packages" ]; then
  rm -rf "$rootfs" "$rootfs.new"
  echo "systemd check: building a Debian $VERSION_CODENAME root with systemd (mmdebstrap, once)" >&2
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    "$VERSION_CODENAME" "$rootfs.new" http://deb.debian.org/debian
  echo "$packages" > "$rootfs.new/.fleetsnitch-check"
  mv "$rootfs.new" "$rootfs"
fi
run="$work/run"
rm -rf "$run"
mkdir -p "$run/etc"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -keyout "$run/etc/server.key" -out "$run/etc/server.pem" 2> /dev/null
printf 'tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n' > "$run/etc/web.yml"
cat > "$run/etc/fleetsnitch.yaml" <<'EOF'
web:
  listen_address: 127.0.0.1:9941
  config_file: /etc/fleetsnitch/web.yml
collector:
  drain_interval: 500ms
exec:
  enabled: true
EOF

nspawn_pid=""
nspawn=""
init_pid=""
cleanup() {
  if [ -n "$init_pid" ] && kill -0 "$init_pid" 2> /dev/null; then
    kill -s SIGRTMIN+4 "$init_pid" 2> /dev/null || true # systemd: power off
  fi
  if [ -n "$nspawn_pid" ]; then
    for _ in $(seq 1 40); do kill -0 "$nspawn_pid" 2> /dev/null || break; sleep 0.5; done
    if kill -0 "$nspawn_pid" 2> /dev/null; then
      [ -z "$nspawn" ] || kill -KILL "$nspawn" 2> /dev/null || true
      kill -KILL "$nspawn_pid" 2> /dev/null || true
    fi
  fi
}
trap cleanup EXIT
timeout 600 systemd-nspawn --quiet --directory="$rootfs" --volatile=overlay --boot \
  --register=no --keep-unit --private-network --machine=fleetsnitch-check \
  --capability=all --system-call-filter='bpf perf_event_open fanotify_init fanotify_mark' \
  --bind-ro="$agent:/usr/local/bin/fleetsnitch" \
  --bind-ro="$unit:/etc/systemd/system/fleetsnitch.service" \
  --bind="$run/etc:/etc/fleetsnitch" > "$run/nspawn.log" 2>&1 < /dev/null &
nspawn_pid=$!
# timeout -> systemd-nspawn -> the container's systemd
for _ in $(seq 1 60); do
  nspawn="$(pgrep -P "$nspawn_pid" -x systemd-nspawn | head -1 || true)"
  [ -n "$nspawn" ] && init_pid="$(pgrep -P "$nspawn" -x systemd | head -1 || true)"
  [ -n "$init_pid" ] && break
  sleep 0.5
done
[ -n "$init_pid" ] || fail "systemd-nspawn did not start a container: $(cat "$run/nspawn.log")"
inside() { nsenter --target "$init_pid" --all "$@"; }
state=""
for _ in $(seq 1 60); do # the bus appears a moment after PID 1
  state="$(inside timeout 60 systemctl is-system-running --wait 2> /dev/null || true)"
  case "$state" in running | degraded) break ;; esac
  sleep 0.5
done
case "$state" in running | degraded) ;; *) fail "the container's systemd did not boot ($state): $(tail -20 "$run/nspawn.log")" ;; esac
echo "systemd check: systemd $(inside systemctl --version | head -1 | cut -d' ' -f2) runs as PID 1 of a container ($state)"

journal() { inside journalctl --no-pager -o cat -u fleetsnitch.service; }
show() { inside systemctl show -P "$1" fleetsnitch.service; }
metrics() { inside curl -sk --max-time 2 https://127.0.0.1:9941/metrics; }
wait_healthy() {
  for _ in $(seq 1 120); do
    inside curl -sfk --max-time 1 https://127.0.0.1:9941/healthz > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "no /healthz answer; status: $(inside systemctl status --no-pager fleetsnitch.service | head -5); log: $(journal | tail -20)"
}

inside systemctl start fleetsnitch.service || fail "systemctl start: $(journal | tail -20)"
wait_healthy
pid="$(show MainPID)"
[ "$(show ActiveState)/$(show SubState)" = active/running ] || fail "service not running: $(show ActiveState)/$(show SubState)"
status="$(inside cat "/proc/$pid/status")"
grep -qx $'Seccomp:\t2' <<< "$status" || fail "the agent runs without a seccomp filter: $(grep Seccomp <<< "$status")"
grep -qx $'NoNewPrivs:\t1' <<< "$status" || fail "the agent runs without no_new_privs"
# Bits of BPF 39, PERFMON 38, SYS_RESOURCE 24, SYS_ADMIN 21, SYS_PTRACE 19,
# NET_ADMIN 12, SETPCAP 8, DAC_READ_SEARCH 2: CapabilityBoundingSet= of the unit.
allowed=$(( (1 << 39) | (1 << 38) | (1 << 24) | (1 << 21) | (1 << 19) | (1 << 12) | (1 << 8) | (1 << 2) ))
bounding=$(( 16#$(sed -n 's/^CapBnd:\t//p' <<< "$status") ))
(( (bounding & ~allowed) == 0 )) || fail "bounding set $(printf %x "$bounding") exceeds the unit's $(printf %x "$allowed")"
echo "systemd check: fleetsnitch.service active (pid $pid): seccomp filter, no_new_privs, bounding set $(printf %x "$bounding") within the unit's"

page="$(metrics)"
for probe in socket_send socket_receive dns_owners dns_answers; do
  grep -q "^fleetsnitch_probe_attached{probe=\"$probe\",mode=\"[a-z_]*\"} 1" <<< "$page" ||
    fail "probe $probe not attached under the unit's sandbox: $(grep probe_attached <<< "$page"); log: $(journal | grep -i 'warn\|error' | tail -5)"
done
echo "systemd check: probes attached: $(grep -c '^fleetsnitch_probe_attached{.*} 1$' <<< "$page")"

# A program copied to /tmp: counted, hashed, and its modification in place noticed.
inside sh -c 'cp /usr/bin/curl /tmp/fsn-check-curl && /tmp/fsn-check-curl -sk --max-time 2 https://127.0.0.1:9941/healthz > /dev/null'
hash="$(sha256sum < "$rootfs/usr/bin/curl" | cut -d' ' -f1)"
for _ in $(seq 1 40); do
  page="$(metrics)"
  grep -q "^fleetsnitch_executable_info{exe=\"/tmp/fsn-check-curl\",sha256=\"$hash\"} 1" <<< "$page" &&
    grep -q '^fleetsnitch_bytes_total{exe="/tmp/fsn-check-curl",direction="sent"' <<< "$page" && break
  sleep 0.5
done
grep -q "^fleetsnitch_executable_info{exe=\"/tmp/fsn-check-curl\",sha256=\"$hash\"} 1" <<< "$page" ||
  fail "/tmp/fsn-check-curl not hashed to $hash: $(grep fsn-check-curl <<< "$page")"
grep -q '^fleetsnitch_bytes_total{exe="/tmp/fsn-check-curl",direction="sent"' <<< "$page" ||
  fail "bytes of /tmp/fsn-check-curl not counted"
inside sh -c 'printf x >> /tmp/fsn-check-curl'
for _ in $(seq 1 40); do
  page="$(metrics)"
  grep -q '^fleetsnitch_executable_modified_timestamp_seconds{exe="/tmp/fsn-check-curl"}' <<< "$page" && break
  sleep 0.5
done
grep -q '^fleetsnitch_executable_modified_timestamp_seconds{exe="/tmp/fsn-check-curl"}' <<< "$page" ||
  fail "modification of /tmp/fsn-check-curl in place not noticed: $(journal | grep -i fanotify | tail -3)"
echo "systemd check: /tmp/fsn-check-curl counted, hashed ($hash) and its modification noticed"

# ExecReload: SIGHUP to the same process, which re-reads the web configuration.
inside systemctl reload fleetsnitch.service || fail "systemctl reload"
for _ in $(seq 1 20); do grep -q 'SIGHUP: re-reading the web configuration' <<< "$(journal)" && break; sleep 0.5; done
grep -q 'SIGHUP: re-reading the web configuration' <<< "$(journal)" || fail "no reload after systemctl reload: $(journal | tail -5)"
[ "$(show MainPID)" = "$pid" ] || fail "systemctl reload replaced the process ($pid -> $(show MainPID))"
wait_healthy
echo "systemd check: systemctl reload: SIGHUP to pid $pid, web configuration re-read, still serving"

# Without a web configuration a reload must not leave the agent stopped.
sed -i '/config_file:/d' "$run/etc/fleetsnitch.yaml"
inside systemctl restart fleetsnitch.service
for _ in $(seq 1 120); do inside curl -sf --max-time 1 http://127.0.0.1:9941/healthz > /dev/null 2>&1 && break; sleep 0.5; done
before="$(show MainPID)"
inside systemctl reload fleetsnitch.service || fail "systemctl reload without a web configuration"
sleep 1
for _ in $(seq 1 40); do
  [ "$(show ActiveState)/$(show SubState)" = active/running ] && inside curl -sf --max-time 1 http://127.0.0.1:9941/healthz > /dev/null 2>&1 && break
  sleep 0.5
done
[ "$(show ActiveState)/$(show SubState)" = active/running ] || fail "service stopped by systemctl reload without a web configuration"
[ "$(show MainPID)" = "$before" ] || fail "systemctl reload without a web configuration replaced the process ($before -> $(show MainPID)): SIGHUP must not kill the agent"
grep -q 'SIGHUP: nothing to reload' <<< "$(journal)" || fail "no 'nothing to reload' line after SIGHUP: $(journal | tail -5)"
echo "systemd check: reload without a web configuration: same process, still running"

inside systemctl stop fleetsnitch.service
[ "$(show Result)" = success ] || fail "systemctl stop: result $(show Result)"
for _ in $(seq 1 20); do grep -q 'shutting down: final drain' <<< "$(journal)" && break; sleep 0.5; done
grep -q 'shutting down: final drain' <<< "$(journal)" || fail "no final drain on stop: $(journal | tail -5)"
echo "systemd check: systemctl stop: final drain, result success"
