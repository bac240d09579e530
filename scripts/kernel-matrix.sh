#!/usr/bin/env bash
# Kernel compatibility matrix: boots Debian's cloud kernels (tests/kernels/kernels.list)
# under qemu (software emulation) with a minimal initramfs holding the agent,
# trafficgen, busybox and iproute2, runs tests/kernels/checks.sh in each guest and
# on the host kernel, and prints a table kernel x probe mode x scenario x verdict.
#
#   scripts/kernel-matrix.sh [--kernels "5.10 6.1 6.12 host"] [--scenarios "..."]
#                            [--modes "tp_btf fexit kprobe"] [--jobs N]
#                            [--timeout SECONDS] [--results FILE] [--keep] [--dump-logs]
#
# Exit status: 0 every row of every boot passed (or the agent refused a mode the
# kernel lacks, with a clear message, where kernels.list says it must) and every
# kernel's last boot finished (exit status 0, end marker MXDONE, and in a guest the
# exit marker MXEXIT|<kernel>|0); 1 otherwise; 77 (or $FSN_MATRIX_SKIP_CODE) the
# matrix cannot run here (not root, qemu or the kernels cannot be installed): the
# reason is printed. A guest is booted a second time, alone, only when its first boot
# ended before any agent answered /healthz; the summary names each retry and why,
# and the first boot's rows still count. That every run produced every row it owes
# is judged by tests/tests/kernel_matrix.rs, which reads --results.
#
# Installs what it needs, idempotently: qemu-system-x86, busybox-static, cpio,
# iproute2, xz-utils, zstd. Kernels are fetched with apt-get download through a
# private apt configuration (the system's sources are not touched) and cached under
# .cache/kernels/ ($FSN_KERNEL_CACHE). Binaries: $FLEETSNITCH_BIN and $TRAFFICGEN_BIN,
# else built with cargo (debug profile).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
KDIR=$REPO/tests/kernels
CACHE=${FSN_KERNEL_CACHE:-$REPO/.cache/kernels}
SKIP_CODE=${FSN_MATRIX_SKIP_CODE:-77}
KERNELS="5.10 6.1 6.12 host"
SCENARIOS="tcp_download tcp_upload udp_both ipv6_tcp short_lived loopback sendmmsg recvmmsg
  sendfile_upload splice_download io_uring_send io_uring_recv"
MODES="tp_btf fexit kprobe"
JOBS=2
# Per guest (and for the host's run). Quiet, the slowest guest (6.12, three agent
# runs) finished its checks in 207 and 209 s (two runs), two guests sharing 2 cores.
# Under CPU starvation each agent stop alone grows from 0.9-3.0 s to 7.5-16.6 s (the
# kernel's probe detach, measured over 30 + 30 boots of 5.10): 600 s leaves room for
# three starved stops and a general slowdown, so a starved guest finishes instead of
# being retried.
VM_TIMEOUT=600
RESULTS=
KEEP=

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case $1 in
    --kernels) KERNELS=$2; shift 2 ;;
    --scenarios) SCENARIOS=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --timeout) VM_TIMEOUT=$2; shift 2 ;;
    --results) RESULTS=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    --dump-logs) export MX_DUMP_LOGS=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "kernel-matrix: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# One line, single spaces: the lists also go into the guests' settings.
SCENARIOS=$(echo $SCENARIOS)
MODES=$(echo $MODES)

note() { echo "kernel-matrix: $*" >&2; }
skip() {
  echo "SKIP: kernel matrix: $*"
  exit "$SKIP_CODE"
}

[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces, eBPF, package installs)"

# --- packages ------------------------------------------------------------------------

PACKAGES=(qemu-system-x86 busybox-static cpio iproute2 xz-utils zstd)
missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' ||
    missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  note "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 &&
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; }; then
    skip "cannot install ${missing[*]} with apt-get"
  fi
fi
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 is not installed"

# --- work directory and cleanup ------------------------------------------------------

WORK=$(mktemp -d /tmp/fsn-kmatrix.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    # Each job runs in its own process group (setsid): end the group.
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "$KEEP" ]; then note "keeping $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- binaries ------------------------------------------------------------------------

TARGET=${CARGO_TARGET_DIR:-$REPO/target}
AGENT_BIN=${FLEETSNITCH_BIN:-}
TRAFFICGEN=${TRAFFICGEN_BIN:-}
if [ -z "$AGENT_BIN" ] || [ -z "$TRAFFICGEN" ]; then
  note "building the agent and trafficgen"
  (cd "$REPO" && cargo build -q -p fleetsnitch -p fleetsnitch-e2e --bins)
  AGENT_BIN=${AGENT_BIN:-$TARGET/debug/fleetsnitch}
  TRAFFICGEN=${TRAFFICGEN:-$TARGET/debug/trafficgen}
fi
for bin in "$AGENT_BIN" "$TRAFFICGEN"; do
  [ -x "$bin" ] || { echo "kernel-matrix: $bin is missing" >&2; exit 1; }
done

# --- kernels -------------------------------------------------------------------------

APT_DIR=$CACHE/apt
apt_private() {
  local tool=$1
  shift
  "$tool" -o Dir::Etc::SourceList="$APT_DIR/sources.list" -o Dir::Etc::SourceParts=/dev/null \
    -o Dir::State::Lists="$APT_DIR/lists" -o Dir::Cache="$APT_DIR/cache" \
    -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Sandbox::User=root \
    -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false \
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false "$@"
}

# The Debian archive the system's own apt sources use (deb822 or one-line format),
# with Debian's signing keyring.
debian_uri() {
  grep -hE '^\s*(URIs:|deb )' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null |
    grep -oE 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' | head -n 1
}

APT_READY=
apt_update() {
  [ -n "$APT_READY" ] && return 0
  mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
  local uri suite
  uri=$(debian_uri)
  if [ -z "$uri" ] || [ ! -r /usr/share/keyrings/debian-archive-keyring.gpg ]; then
    note "no Debian archive in the system's apt sources, or no debian-archive-keyring"
    return 1
  fi
  : >"$APT_DIR/sources.list"
  while read -r _ suite _; do
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main" \
      >>"$APT_DIR/sources.list"
  done < <(grep -vE '^\s*(#|$)' "$KDIR/kernels.list")
  note "updating the private apt lists ($uri)"
  apt_private apt-get update -qq >/dev/null 2>"$WORK/apt-update.err" || return 1
  APT_READY=1
}

# fetch_kernel LABEL SUITE: fills $CACHE/LABEL/{vmlinuz,config,modules/,package}.
fetch_kernel() {
  local label=$1 suite=$2 dir=$CACHE/$1
  if [ -s "$dir/vmlinuz" ] && [ -s "$dir/package" ] && [ -z "${FSN_MATRIX_REFRESH:-}" ]; then
    return 0
  fi
  apt_update || { cat "$WORK/apt-update.err" >&2 2>/dev/null; return 1; }
  local version meta package
  version=$(apt_private apt-cache madison linux-image-cloud-amd64 |
    awk -F'|' -v s=" $suite/" 'index($3, s) { gsub(/ /, "", $2); print $2; exit }')
  [ -n "$version" ] || { note "no linux-image-cloud-amd64 in $suite"; return 1; }
  meta=$(apt_private apt-cache show "linux-image-cloud-amd64=$version" | sed -n 's/^Depends: //p' | head -n 1)
  package=$(echo "$meta" | tr ',' '\n' | sed -n 's/^ *\(linux-image-[^ ]*-cloud-amd64\).*/\1/p' | head -n 1)
  [ -n "$package" ] || { note "cannot tell which kernel linux-image-cloud-amd64=$version depends on"; return 1; }
  note "downloading $package ($suite)"
  rm -rf "$dir" "$WORK/deb-$label"
  mkdir -p "$WORK/deb-$label" "$dir/modules"
  (cd "$WORK/deb-$label" && apt_private apt-get download -qq "$package" >/dev/null 2>&1) || return 1
  # Only the kernel, its config and the veth module: the rest is not needed.
  mkdir -p "$WORK/deb-$label/x"
  dpkg-deb --fsys-tarfile "$WORK/deb-$label"/*.deb |
    tar -x -C "$WORK/deb-$label/x" --wildcards './boot/vmlinuz-*' './boot/config-*' '*/veth.ko*'
  cp "$WORK/deb-$label"/x/boot/vmlinuz-* "$dir/vmlinuz"
  cp "$WORK/deb-$label"/x/boot/config-* "$dir/config"
  local ko
  ko=$(find "$WORK/deb-$label/x" -name 'veth.ko*' | head -n 1)
  case $ko in
    *.xz) xz -dc "$ko" >"$dir/modules/veth.ko" ;;
    *.zst) zstd -qdc "$ko" >"$dir/modules/veth.ko" ;;
    *.ko) cp "$ko" "$dir/modules/veth.ko" ;;
    *) note "$package has no veth module (built in?)" ;;
  esac
  echo "$package $version" >"$dir/package"
  rm -rf "$WORK/deb-$label"
}

# --- initramfs -----------------------------------------------------------------------

# copy_with_libs SRC DEST_IN_ROOT: the binary (without debug info) and its libraries.
copy_with_libs() {
  local root=$WORK/root src=$1 dest=$2 lib
  mkdir -p "$root$(dirname "$dest")"
  strip --strip-debug -o "$root$dest" "$src" 2>/dev/null || cp "$src" "$root$dest"
  chmod 0755 "$root$dest"
  for lib in $(ldd "$src" | grep -oE '/[^ ]+' | sort -u); do
    [ -e "$root$lib" ] && continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

build_base_initramfs() {
  local root=$WORK/root applet
  mkdir -p "$root"/{bin,usr/bin,matrix,proc,sys,dev,tmp,run,var}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
  done
  copy_with_libs "$(command -v ip)" /usr/bin/ip
  copy_with_libs "$AGENT_BIN" /usr/bin/fleetsnitch
  copy_with_libs "$TRAFFICGEN" /usr/bin/trafficgen
  cp "$KDIR/guest-init.sh" "$root/init"
  cp "$KDIR/checks.sh" "$root/matrix/checks.sh"
  chmod 0755 "$root/init"
  (cd "$root" && find . | cpio -o -H newc --quiet) >"$WORK/base.cpio"
}

# kernel_initramfs LABEL EXPECT: base + this kernel's modules and settings.
kernel_initramfs() {
  local label=$1 expect=$2 root=$WORK/root-$label
  mkdir -p "$root/matrix/modules"
  cp "$CACHE/$label"/modules/*.ko "$root/matrix/modules/" 2>/dev/null || true
  {
    echo "MX_KERNEL='$label'"
    echo "MX_EXPECT='$expect'"
    echo "MX_SCENARIOS='$SCENARIOS'"
    echo "MX_MODES='$MODES'"
    echo "MX_SCALE=1"
    echo "MX_STARTUP=300"
    echo "MX_DUMP_LOGS='${MX_DUMP_LOGS:-}'"
  } >"$root/matrix/env"
  (cd "$root" && find . | cpio -o -H newc --quiet) >"$WORK/$label.cpio"
  cat "$WORK/base.cpio" "$WORK/$label.cpio" >"$WORK/initrd-$label.cpio"
}

# --- runs ----------------------------------------------------------------------------

# launch NAME COMMAND...: runs COMMAND in the background in a session of its own
# (so cleanup can end it with everything it started), output to $WORK/NAME.serial.
declare -A JOB=()
launch() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$WORK/$name.serial" 2>&1 &
  PIDS+=($!)
  JOB[$!]=$name
}

# reap [PID...]: waits for one of the jobs, records its exit status in $WORK/NAME.rc
# and its pid in $REAPED.
reap() {
  local rc=0
  REAPED=
  wait -n -p REAPED "$@" || rc=$?
  [ -n "$REAPED" ] && echo "$rc" >"$WORK/${JOB[$REAPED]}.rc"
}

# launch_vm LABEL BOOT: the guest's console is its serial port, on qemu's stdout, in
# $WORK/LABEL.BOOT.serial; no network device. The guest powers off when its checks
# end, and qemu exits 0; the timeout kills it otherwise (exit 124).
launch_vm() {
  local label=$1 boot=$2
  launch "$label.$boot" timeout -k 10 "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max \
    -smp 2 -m 2048 -kernel "$CACHE/$label/vmlinuz" -initrd "$WORK/initrd-$label.cpio" \
    -append "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=1" \
    -display none -monitor none -serial stdio -nic none -no-reboot
}

# console NAME: the lines of a console the results keep (the guest's rows and markers;
# kernel messages and everything else are left out).
console() {
  tr -d '\r' <"$WORK/$1.serial" | grep -oE '(MATRIX|MXRUN|MXDONE|MXBOOT|MXLOG|MXEXIT)\|.*' || true
}

# retry_reason LABEL: why the first boot of a guest may be replaced by a second, or
# nothing (and status 1) when it may not. Only a boot that ended before any agent
# answered /healthz qualifies: it never ran a check, so a second boot hides nothing.
# A boot that started the agent, printed a FAIL row or finished cleanly stands.
retry_reason() {
  local label=$1 name=$1.1 rc lines last
  rc=$(cat "$WORK/$name.rc" 2>/dev/null || echo '?')
  lines=$(console "$name")
  if [ "$rc" = 0 ] && grep -q "^MXEXIT|$label|0\$" <<<"$lines"; then return 1; fi
  grep -qE '^MXRUN\|[^|]*\|[^|]*\|(healthy|attached)\|' <<<"$lines" && return 1
  grep -qE '^(MATRIX\|.*|MXRUN\|[^|]*\|[^|]*\|refused)\|FAIL\|' <<<"$lines" && return 1
  last=$(tr -d '\r' <"$WORK/$name.serial" | grep -v '^\s*$' | tail -n 1 | tr '|' '/' | cut -c1-120)
  printf 'boot 1 ended with exit %s%s before the agent answered /healthz%s; last console line: %s' \
    "$rc" "$([ "$rc" = 124 ] && echo " (killed by the ${VM_TIMEOUT}s timeout)")" \
    "$(tr -d '\r' <"$WORK/$name.serial" | grep -q 'soft lockup' && echo ', soft lockups on its console')" \
    "${last:-(none)}"
}

START=$(date +%s)
vm_labels=()
declare -A EXPECT=()
while read -r label suite expect; do
  case " $KERNELS " in *" $label "*) ;; *) continue ;; esac
  fetch_kernel "$label" "$suite" || skip "cannot download the $suite cloud kernel with apt-get"
  grep -q '^CONFIG_DEBUG_INFO_BTF=y' "$CACHE/$label/config" ||
    note "$label: CONFIG_DEBUG_INFO_BTF is not set: the agent must refuse to start"
  vm_labels+=("$label")
  EXPECT[$label]=$expect
done < <(grep -vE '^\s*(#|$)' "$KDIR/kernels.list")

if [ ${#vm_labels[@]} -gt 0 ]; then
  build_base_initramfs
  for label in "${vm_labels[@]}"; do
    kernel_initramfs "$label" "${EXPECT[$label]}"
  done
fi

# The host first (fast, and alone: its timings are not disturbed), then the guests,
# $JOBS at a time. labels: the kernel names the checks print (host-<version> for the
# host), in order; BOOTS[label]: how many times it ran.
labels=()
declare -A BOOTS=() RETRY=()
HOST_KERNEL="host-$(uname -r | cut -d- -f1)"
case " $KERNELS " in
  *" host "*)
    note "host kernel $(uname -r)"
    launch "$HOST_KERNEL.1" env MX_KERNEL="$HOST_KERNEL" MX_AGENT="$AGENT_BIN" \
      MX_TRAFFICGEN="$TRAFFICGEN" MX_BUSYBOX=/bin/busybox MX_IP="$(command -v ip)" \
      MX_SCENARIOS="$SCENARIOS" MX_MODES="$MODES" timeout -k 10 "$VM_TIMEOUT" /bin/busybox sh "$KDIR/checks.sh"
    reap "${PIDS[-1]}"
    labels+=("$HOST_KERNEL")
    BOOTS[$HOST_KERNEL]=1
    ;;
esac
running=()
for label in "${vm_labels[@]}"; do
  while [ ${#running[@]} -ge "$JOBS" ]; do
    reap "${running[@]}"
    alive=()
    for pid in "${running[@]}"; do [ "$pid" = "$REAPED" ] || alive+=("$pid"); done
    running=("${alive[@]}")
  done
  note "booting $label ($(cut -d' ' -f1 "$CACHE/$label/package")) under qemu"
  launch_vm "$label" 1
  running+=("${PIDS[-1]}")
  labels+=("$label")
  BOOTS[$label]=1
done
while [ ${#running[@]} -gt 0 ]; do
  reap "${running[@]}"
  alive=()
  for pid in "${running[@]}"; do [ "$pid" = "$REAPED" ] || alive+=("$pid"); done
  running=("${alive[@]}")
done
# One more boot, alone, for a guest whose first boot never got to start the agent
# (see retry_reason). Its rows, and the first boot's, are all kept.
for label in "${vm_labels[@]}"; do
  if reason=$(retry_reason "$label"); then
    note "$label: booting it once more, alone: $reason"
    RETRY[$label]=$reason
    launch_vm "$label" 2
    reap "${PIDS[-1]}"
    BOOTS[$label]=2
  fi
done
ELAPSED=$(($(date +%s) - START))

# --- results -------------------------------------------------------------------------

# Every boot of every kernel, in order, each between MXBEGIN and MXSTATUS (its exit
# status: qemu's for a guest, 124 when the timeout killed it; checks.sh's on the host),
# a second boot preceded by MXRETRY with its reason. tests/tests/kernel_matrix.rs
# judges this file; the table below is the script's own reading of it.
ALL=$WORK/results
VERDICTS=$WORK/verdicts
: >"$ALL"
: >"$VERDICTS"
for label in "${labels[@]}"; do
  boots=${BOOTS[$label]}
  for ((boot = 1; boot <= boots; boot++)); do
    name=$label.$boot
    rc=$(cat "$WORK/$name.rc" 2>/dev/null || echo '?')
    [ "$boot" -gt 1 ] && echo "MXRETRY|$label|$boot|${RETRY[$label]}" >>"$ALL"
    echo "MXBEGIN|$label|$boot|$([ "$label" = "$HOST_KERNEL" ] && echo "host, no qemu" || echo "qemu, $(cut -d' ' -f1 "$CACHE/$label/package")")" >>"$ALL"
    console "$name" >"$WORK/$name.lines"
    cat "$WORK/$name.lines" >>"$ALL"
    echo "MXSTATUS|$label|$boot|$rc" >>"$ALL"
    # The boot that counts is the last one; an earlier one only through its rows.
    [ "$boot" -eq "$boots" ] || continue
    problems=()
    [ "$rc" = 0 ] || problems+=("exit status $rc$([ "$rc" = 124 ] && echo " (killed by the ${VM_TIMEOUT}s timeout)")")
    grep -q '^MXDONE|' "$WORK/$name.lines" || problems+=("no MXDONE: the checks did not finish")
    if [ "$label" != "$HOST_KERNEL" ] && ! grep -q "^MXEXIT|$label|0\$" "$WORK/$name.lines"; then
      problems+=("no MXEXIT|$label|0: the guest did not get to power off after its checks")
    fi
    if [ ${#problems[@]} -gt 0 ]; then
      reason=$(IFS=';'; echo "boot $boot: ${problems[*]}" | sed 's/;/; /g')
      echo "MATRIX|$label|-|run|-|-|-|-|FAIL|$reason" >>"$VERDICTS"
      note "$label $reason; last console lines:"
      tr -d '\r' <"$WORK/$name.serial" | tail -n 15 | sed 's/^/    /' >&2
    fi
  done
done
[ -n "$RESULTS" ] && cp "$ALL" "$RESULTS"

grep '^MXLOG|' "$ALL" | grep -v '|setup|kernel ' | sed 's/^MXLOG|/  log: /' >&2 || true

# One row per kernel x probe mode x scenario, over every boot; a refused mode is one row.
status=0
awk -F'|' '
  function verdict_of(key) { return (key in fail) ? "FAIL" : "PASS" }
  function counts(e, s, d) { return (e == s) ? e : e "/" s "/" d }
  $1 == "MXRUN" && $4 == "attached" {
    n = split($5, pairs, ",")
    send = recv = "?"
    for (i = 1; i <= n; i++) {
      split(pairs[i], kv, "=")
      if (kv[1] == "socket_send") send = kv[2]
      if (kv[1] == "socket_receive") recv = kv[2]
    }
    m = (send == recv) ? send : send "/" recv
    mode[$2 "|" $3] = ($3 == "default") ? m " (default)" : m
    next
  }
  $1 == "MXRUN" && $4 == "refused" {
    key = $2 "|" $3 "|(start)"
    if (!(key in seen)) { seen[key] = 1; order[++rows] = key }
    mode[$2 "|" $3] = $3
    msg = $6; for (i = 7; i <= NF; i++) msg = msg "|" $i
    if (length(msg) > 150) msg = substr(msg, 1, 147) "..."
    note[key] = ($5 == "PASS" ? "refused as expected: " : "refused: ") msg
    if ($5 != "PASS") fail[key] = 1
    next
  }
  $1 == "MATRIX" {
    key = $2 "|" $3 "|" $4
    if (!(key in seen)) { seen[key] = 1; order[++rows] = key }
    if ($5 == "sent") sent[key] = counts($6, $7, $8)
    else if ($5 == "received") recvd[key] = counts($6, $7, $8)
    else if ($5 ~ /^peer_/) { if ($9 != "PASS") peer[key] = "FAIL"; else if (!(key in peer)) peer[key] = "ok" }
    # A failure, or a pass within a bound the row declares: say what differed.
    if ($9 != "PASS" || ($8 != "0" && $8 != "-")) {
      if ($9 != "PASS") fail[key] = 1
      what = ($8 != "-") ? "expected " $6 ", seen " $7 ", diff " $8 : ($6 $7 != "--") ? "expected " $6 ", seen " $7 : ""
      what = what ($10 != "" ? (what != "" ? " (" $10 ")" : $10) : "")
      note[key] = note[key] (note[key] == "" ? "" : "; ") ($5 != "-" ? $5 ": " : "") what
    }
  }
  END {
    fmt = "%-14s %-20s %-16s %-24s %-24s %-5s %-7s %s\n"
    printf fmt, "KERNEL", "PROBE MODE", "SCENARIO", "SENT exp[/seen/diff]", "RECEIVED exp[/seen/diff]", "PEER", "VERDICT", "NOTE"
    for (i = 1; i <= rows; i++) {
      split(order[i], k, "|")
      v = verdict_of(order[i])
      if (k[3] == "(start)" && v == "PASS") v = "REFUSED"
      m = mode[k[1] "|" k[2]]; if (m == "") m = k[2]
      printf fmt, k[1], m, k[3], (order[i] in sent) ? sent[order[i]] : "-",
        (order[i] in recvd) ? recvd[order[i]] : "-", (order[i] in peer) ? peer[order[i]] : "-", v, note[order[i]]
      if (v == "FAIL") failed++
    }
    printf "\n%d rows, %d failed\n", rows, failed
    exit failed > 0
  }' "$ALL" "$VERDICTS" || status=$?
echo "probes attached (from fleetsnitch_probe_attached; the log agrees, or a row above fails):"
awk -F'|' '$1 == "MXRUN" && $4 == "attached" { printf "  %-14s %-8s %s\n", $2, $3, $5 }' "$ALL"
for label in "${labels[@]}"; do
  name=$label.${BOOTS[$label]}
  boot=$(grep -m1 '^MXBOOT|' "$WORK/$name.lines" | awk -F'|' '{ print "kernel " $3 " up in " $4 ", " }' || true)
  done_s=$(grep -m1 '^MXDONE|' "$WORK/$name.lines" | cut -d'|' -f3 || true)
  stops=$(grep -E '^MATRIX\|[^|]*\|[^|]*\|shutdown\|' "$WORK/$name.lines" | sed -E 's/.* ([0-9.]+)s after SIGTERM.*/\1/' | paste -sd' ' - || true)
  echo "$label: ${boot}checks ${done_s:-?}s, agent stops ${stops:-none} s, exit status $(cat "$WORK/$name.rc" 2>/dev/null || echo '?')"
done
if [ ${#RETRY[@]} -gt 0 ]; then
  echo "retries (every row of every boot counts):"
  for label in "${!RETRY[@]}"; do echo "  $label booted twice: ${RETRY[$label]}"; done
else
  echo "retries: none"
fi
echo "kernel matrix: ${ELAPSED}s in total"
exit $status
