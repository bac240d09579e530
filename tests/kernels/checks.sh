#!/bin/sh
# The checks of the kernel compatibility matrix, run on one kernel: inside a
# qemu guest (from guest-init.sh) or on the host (from scripts/kernel-matrix.sh).
# Plain POSIX sh + busybox applets + iproute2 `ip`, so both places run the same code.
#
# For each socket probe mode (the agent's own choice first, then each other mode
# forced by disabling the rest through probes.disabled_modes) it starts the agent,
# records the mode every probe attached in, runs each scenario from a uniquely
# named copy of trafficgen, and compares the bytes /metrics attributes to that
# copy with what the copy counted itself. A mode the kernel cannot provide must
# make the agent refuse to start with a message naming the probe, what it needs
# and why the mode was rejected.
#
# Output: one line per result on stdout, fields separated by '|':
#   MXRUN|kernel|mode|attached|probe=mode,...            agent started, modes seen
#   MXRUN|kernel|mode|refused|<verdict>|<agent message>  agent refused to start
#   MATRIX|kernel|mode|scenario|part|expected|reported|verdict|note
#     part: sent / received (the client copy), peer_sent / peer_received (the
#     peer server copy, mirrored expectation), self (agent self-metrics).
#   MXLOG|kernel|mode|text                              diagnostics
# and MXDONE|kernel|seconds at the end.
#
# Environment (all optional except MX_AGENT and MX_TRAFFICGEN):
#   MX_KERNEL      label for the output (default: uname -r)
#   MX_AGENT       fleetsnitch binary          MX_TRAFFICGEN  trafficgen binary
#   MX_BUSYBOX     busybox binary (default busybox)
#   MX_IP          iproute2 ip binary (default /usr/bin/ip)
#   MX_MODES       socket probe modes to force after the default run (default: tp_btf fexit kprobe)
#   MX_EXPECT      "mode=attach|refuse ..." expectations; a mode not listed may do either,
#                  but a refusal must still be clear
#   MX_SCENARIOS   scenarios to run (default below)
#   MX_SCALE       divide scenario sizes by this (default 1)
#   MX_STARTUP     seconds the agent gets to start (default 240)
#   MX_DUMP_LOGS   non-empty: print every agent log line (as MXLOG)
#   MX_LISTEN      agent listen address (default 127.0.0.1:9941; the agent runs in the
#                  client namespace, so this never collides with the host's)
set -u

BB=${MX_BUSYBOX:-busybox}
# iproute2's ip by absolute path: busybox sh would otherwise run its own ip applet,
# which knows no network namespaces.
IP=${MX_IP:-/usr/bin/ip}
KERNEL=${MX_KERNEL:-$(uname -r)}
AGENT=${MX_AGENT:?MX_AGENT is required}
TRAFFICGEN=${MX_TRAFFICGEN:?MX_TRAFFICGEN is required}
MODES=${MX_MODES-tp_btf fexit kprobe}
EXPECT=${MX_EXPECT-}
SCENARIOS=${MX_SCENARIOS-tcp_download tcp_upload udp_both ipv6_tcp short_lived loopback}
SCALE=${MX_SCALE:-1}
STARTUP=${MX_STARTUP:-240}
LISTEN=${MX_LISTEN:-127.0.0.1:9941}
PEER_V4=198.18.0.2
PEER_V6=fd00:f5::2
START=$($BB date +%s)
# Plain log lines: they are parsed below.
export NO_COLOR=1

CLI=fsnmx-cli-$$
PEER=fsnmx-peer-$$
WORK=$($BB mktemp -d /tmp/fsnmx.XXXXXX) || exit 1
WORK=$($BB realpath "$WORK")
PEER_PID=
AGENT_PID=

say() { echo "$*"; }
log() { echo "MXLOG|$KERNEL|${RUN:-setup}|$*"; }

cleanup() {
	[ -n "$AGENT_PID" ] && kill -KILL "$AGENT_PID" 2>/dev/null
	[ -n "$PEER_PID" ] && kill -KILL "$PEER_PID" 2>/dev/null
	$IP netns del "$CLI" 2>/dev/null
	$IP netns del "$PEER" 2>/dev/null
	[ -n "${MX_KEEP:-}" ] || $BB rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- network: client and peer namespaces joined by a veth pair -----------------------

setup_net() {
	$IP netns add "$CLI" && $IP netns add "$PEER" &&
		$IP link add fsnc0 netns "$CLI" type veth peer name fsnp0 netns "$PEER" || return 1
	$IP -n "$CLI" addr add 198.18.0.1/30 dev fsnc0 &&
		$IP -n "$PEER" addr add $PEER_V4/30 dev fsnp0 &&
		$IP -n "$CLI" -6 addr add fd00:f5::1/64 dev fsnc0 nodad &&
		$IP -n "$PEER" -6 addr add $PEER_V6/64 dev fsnp0 nodad || return 1
	for ns in "$CLI" "$PEER"; do
		$IP -n "$ns" link set lo up || return 1
	done
	$IP -n "$CLI" link set fsnc0 up && $IP -n "$PEER" link set fsnp0 up
}

# A copy of trafficgen with a path of its own: every byte it moves must be labelled
# with exactly this path.
copy_exe() {
	dst=$WORK/tg-$1-${RUN:-setup}-$$
	$BB cp "$TRAFFICGEN" "$dst" && $BB chmod 0755 "$dst" && echo "$dst"
}

start_peer() {
	PEER_EXE=$(copy_exe peer) || return 1
	$IP netns exec "$PEER" "$PEER_EXE" serve --v4 $PEER_V4 --v6 $PEER_V6 \
		>"$WORK/peer.out" 2>"$WORK/peer.err" </dev/null &
	PEER_PID=$!
	i=0
	while [ $i -lt 100 ]; do
		$BB grep -q '^ready' "$WORK/peer.out" 2>/dev/null && return 0
		kill -0 "$PEER_PID" 2>/dev/null || break
		$BB sleep 0.2
		i=$((i + 1))
	done
	log "peer server did not start: $($BB tail -n 3 "$WORK/peer.err" | $BB tr '\n' ' ')"
	return 1
}

# --- scraping ------------------------------------------------------------------------

scrape() {
	$IP netns exec "$CLI" $BB timeout 10 $BB wget -q -O "$WORK/metrics.tmp" "http://$LISTEN/metrics" 2>/dev/null &&
		$BB mv "$WORK/metrics.tmp" "$WORK/metrics"
}

# bytes_of EXE DIRECTION: fleetsnitch_bytes_total summed over every series of EXE.
bytes_of() {
	$BB awk -v want="exe=\"$1\"" -v dir="direction=\"$2\"" '
		/^fleetsnitch_bytes_total\{/ && index($0, want) && index($0, dir) { sum += $NF }
		END { printf "%.0f\n", sum }' "$WORK/metrics"
}

# metric_sum NAME: sum of every series of a metric (0 when absent).
metric_sum() {
	$BB awk -v name="$1" '
		index($0, name) == 1 && (substr($0, length(name) + 1, 1) == "{" || substr($0, length(name) + 1, 1) == " ") { sum += $NF }
		END { printf "%.0f\n", sum }' "$WORK/metrics"
}

# within EXPECTED REPORTED: exit 0 when REPORTED is within +-2% of EXPECTED (exactly 0 for 0).
within() {
	$BB awk -v e="$1" -v r="$2" 'BEGIN {
		if (e == 0) exit !(r == 0)
		d = r - e; if (d < 0) d = -d
		exit !(d <= 0.02 * e) }'
}

# --- one agent run -------------------------------------------------------------------

expected_for() {
	for item in $EXPECT; do
		case $item in "$1"=*) echo "${item#*=}"; return ;; esac
	done
	echo any
}

# start_agent MODE: 0 running and healthy, 1 exited (refused), 2 did not start in time.
start_agent() {
	disabled=
	if [ "$1" != default ]; then
		for m in tp_btf fexit kprobe; do
			[ "$m" = "$1" ] || disabled="$disabled${disabled:+, }$m"
		done
	fi
	# Exec tracking on: its programs must load and attach on every kernel too.
	printf 'probes:\n  disabled_modes: [%s]\nexec:\n  enabled: true\n' "$disabled" >"$WORK/agent-$1.yaml"
	# nsenter switches only the network namespace; `ip netns exec` would also remount
	# /sys, hiding the cgroup2 and tracefs mounts the agent uses.
	$BB nsenter --net="/run/netns/$CLI" "$AGENT" --config.file "$WORK/agent-$1.yaml" \
		--web.listen-address "$LISTEN" --journal.path "$WORK/journal-$1.db" \
		>"$WORK/agent-$1.log" 2>&1 </dev/null &
	AGENT_PID=$!
	t=0
	while [ $t -lt $((STARTUP * 2)) ]; do
		if ! kill -0 "$AGENT_PID" 2>/dev/null; then
			wait "$AGENT_PID"
			AGENT_RC=$?
			AGENT_PID=
			return 1
		fi
		if $IP netns exec "$CLI" $BB timeout 5 $BB wget -q -O /dev/null "http://$LISTEN/healthz" 2>/dev/null; then
			return 0
		fi
		$BB sleep 0.5
		t=$((t + 1))
	done
	return 2
}

stop_agent() {
	[ -n "$AGENT_PID" ] || return 0
	kill -TERM "$AGENT_PID" 2>/dev/null
	i=0
	while kill -0 "$AGENT_PID" 2>/dev/null && [ $i -lt 100 ]; do
		$BB sleep 0.2
		i=$((i + 1))
	done
	kill -KILL "$AGENT_PID" 2>/dev/null
	wait "$AGENT_PID" 2>/dev/null
	AGENT_PID=
}

# The probe=mode pairs /metrics reports as attached, sorted, comma separated.
attached_modes() {
	$BB awk '/^fleetsnitch_probe_attached\{/ && $NF == 1 {
		p = $0; sub(/.*probe="/, "", p); sub(/".*/, "", p)
		m = $0; sub(/.*mode="/, "", m); sub(/".*/, "", m)
		print p "=" m }' "$WORK/metrics" | $BB sort | $BB tr '\n' ',' | $BB sed 's/,$//'
}

mode_of() {
	echo "$2" | $BB tr ',' '\n' | $BB sed -n "s/^$1=//p"
}

# Default size arguments, smaller than trafficgen's own: the guests are emulated.
scenario_args() {
	case $1 in
	tcp_download | tcp_upload | sendfile_upload | splice_download) echo "--bytes $((4194304 / SCALE))" ;;
	ipv6_tcp | io_uring_send | io_uring_recv | loopback | tcp_duplex) echo "--bytes $((2097152 / SCALE))" ;;
	udp_both | udp_443) echo "--bytes $((400000 / SCALE)) --count $((400 / SCALE))" ;;
	sendmmsg | recvmmsg) echo "--bytes $((1000000 / SCALE)) --count $((1000 / SCALE))" ;;
	short_lived) echo "--bytes $((48000 / SCALE)) --count $((48 / SCALE))" ;;
	*) ;;
	esac
}

# Scenarios whose peer is the trafficgen server and whose bytes mirror exactly.
has_peer_mirror() {
	case $1 in
	tcp_download | tcp_upload | ipv6_tcp | tcp_duplex | sendfile_upload | splice_download | io_uring_send | io_uring_recv | short_lived) return 0 ;;
	*) return 1 ;;
	esac
}

run_scenario() {
	scenario=$1
	exe=$(copy_exe "$scenario") || {
		say "MATRIX|$KERNEL|$RUN|$scenario|sent|-|-|FAIL|cannot copy trafficgen"
		return
	}
	scrape
	peer_sent0=$(bytes_of "$PEER_EXE" sent)
	peer_recv0=$(bytes_of "$PEER_EXE" received)
	# shellcheck disable=SC2046 # word splitting of the size arguments is wanted
	$IP netns exec "$CLI" $BB timeout 300 "$exe" client "$scenario" --peer-v4 $PEER_V4 \
		--peer-v6 $PEER_V6 $(scenario_args "$scenario") >"$WORK/client.out" 2>"$WORK/client.err" </dev/null
	rc=$?
	json=$($BB grep '^{' "$WORK/client.out" | $BB tail -n 1)
	sent=$(echo "$json" | $BB sed -n 's/.*"sent":\([0-9]*\).*/\1/p')
	received=$(echo "$json" | $BB sed -n 's/.*"received":\([0-9]*\).*/\1/p')
	if [ $rc -ne 0 ] || [ -z "$sent" ] || [ -z "$received" ]; then
		err=$($BB tail -n 2 "$WORK/client.err" | $BB tr '\n|' '  ')
		say "MATRIX|$KERNEL|$RUN|$scenario|sent|-|-|FAIL|trafficgen failed (exit $rc): $err"
		return
	fi
	# /metrics must show the traffic within 2 s; allow more under emulation, then one
	# more drain interval to see that nothing more arrives.
	i=0
	while [ $i -lt 40 ]; do
		$BB sleep 0.5
		scrape || continue
		rs=$(bytes_of "$exe" sent)
		rr=$(bytes_of "$exe" received)
		if within "$sent" "$rs" && within "$received" "$rr"; then
			$BB sleep 1.5
			scrape
			break
		fi
		i=$((i + 1))
	done
	rs=$(bytes_of "$exe" sent)
	rr=$(bytes_of "$exe" received)
	for part in sent received; do
		if [ $part = sent ]; then e=$sent r=$rs; else e=$received r=$rr; fi
		v=FAIL
		within "$e" "$r" && v=PASS
		say "MATRIX|$KERNEL|$RUN|$scenario|$part|$e|$r|$v|$(basename "$exe")"
	done
	if has_peer_mirror "$scenario"; then
		ps=$(($(bytes_of "$PEER_EXE" sent) - peer_sent0))
		pr=$(($(bytes_of "$PEER_EXE" received) - peer_recv0))
		v=FAIL
		within "$received" "$ps" && v=PASS
		say "MATRIX|$KERNEL|$RUN|$scenario|peer_sent|$received|$ps|$v|$(basename "$PEER_EXE")"
		v=FAIL
		within "$sent" "$pr" && v=PASS
		say "MATRIX|$KERNEL|$RUN|$scenario|peer_received|$sent|$pr|$v|$(basename "$PEER_EXE")"
	fi
}

# Self-metrics that must stay at zero: anything else means bytes were not attributed.
check_self() {
	scrape || return
	bad=
	for m in fleetsnitch_unresolved_bytes_total fleetsnitch_unattributed_bytes_total \
		fleetsnitch_events_lost_total fleetsnitch_map_full_total fleetsnitch_drain_errors_total \
		fleetsnitch_exec_events_lost_total; do
		v=$(metric_sum $m)
		[ "$v" = 0 ] || bad="$bad $m=$v"
	done
	if [ -z "$bad" ]; then
		say "MATRIX|$KERNEL|$RUN|self_metrics|self|0|0|PASS|unresolved, unattributed, lost, map full, drain errors, exec events lost"
	else
		say "MATRIX|$KERNEL|$RUN|self_metrics|self|0|-|FAIL|$bad"
	fi
}

# Exec tracking: its probe attached, and the last scenario's copy of trafficgen
# (executed once) is counted in fleetsnitch_exec_total.
check_exec() {
	mode=$(mode_of process_exec "$1")
	if [ -z "$mode" ]; then
		say "MATRIX|$KERNEL|$RUN|exec_tracking|self|attached|none|FAIL|the process_exec probe did not attach"
		return
	fi
	scrape || return
	n=$($BB awk -v want="exe=\"$exe\"" '/^fleetsnitch_exec_total\{/ && index($0, want) { sum += $NF }
		END { printf "%.0f\n", sum }' "$WORK/metrics")
	v=FAIL
	[ "$n" -ge 1 ] && v=PASS
	say "MATRIX|$KERNEL|$RUN|exec_tracking|self|1|$n|$v|process_exec in mode $mode; execs of $(basename "$exe")"
}

# A refusal is clear when it names the probe, what it needs and why the mode failed.
refusal_is_clear() {
	msg=$1 mode=$2
	case $msg in *"cannot run the required probe socket_"*) ;; *) return 1 ;; esac
	case $msg in *"it needs "*) ;; *) return 1 ;; esac
	case $msg in *"$mode: "*) ;; *) return 1 ;; esac
	return 0
}

agent_run() {
	RUN=$1
	start_agent "$RUN"
	started=$?
	if [ $started = 2 ]; then
		say "MXRUN|$KERNEL|$RUN|refused|FAIL|agent did not answer /healthz within ${STARTUP}s"
		$BB tail -n 5 "$WORK/agent-$RUN.log" | while read -r line; do log "$line"; done
		stop_agent
		return
	fi
	if [ $started = 1 ]; then
		# tracing's ERROR line, without the timestamp and level.
		msg=$($BB grep -m1 'ERROR' "$WORK/agent-$RUN.log" | $BB sed 's/^.*ERROR[^ ]* *//; s/^[^ ]*: //' | $BB tr '|' '/')
		[ -n "$msg" ] || msg=$($BB tail -n 1 "$WORK/agent-$RUN.log" | $BB tr '|' '/')
		v=FAIL
		if [ "$RUN" != default ] && [ "$(expected_for "$RUN")" != attach ] &&
			[ "$AGENT_RC" != 0 ] && refusal_is_clear "$msg" "$RUN"; then
			v=PASS
		fi
		say "MXRUN|$KERNEL|$RUN|refused|$v|exit $AGENT_RC: $msg"
		return
	fi
	scrape
	modes=$(attached_modes)
	say "MXRUN|$KERNEL|$RUN|attached|$modes"
	# The log must say the same as /metrics.
	for probe in socket_send socket_receive; do
		m=$(mode_of $probe "$modes")
		if ! $BB grep "probe attached" "$WORK/agent-$RUN.log" | $BB tr -d '"' |
			$BB grep "probe=$probe " | $BB grep -q "mode=$m\$"; then
			say "MATRIX|$KERNEL|$RUN|attach|$probe|-|$m|FAIL|the log does not report $probe in mode $m"
		fi
		if [ "$RUN" != default ] && [ "$m" != "$RUN" ]; then
			say "MATRIX|$KERNEL|$RUN|attach|$probe|$RUN|$m|FAIL|forced mode not used"
		fi
	done
	if [ "$RUN" != default ] && [ "$(expected_for "$RUN")" = refuse ]; then
		say "MATRIX|$KERNEL|$RUN|attach|socket_send|refuse|$RUN|FAIL|expected this kernel to refuse $RUN"
	fi
	for scenario in $SCENARIOS; do
		run_scenario "$scenario"
		if ! kill -0 "$AGENT_PID" 2>/dev/null; then
			say "MATRIX|$KERNEL|$RUN|agent|self|-|-|FAIL|the agent died"
			$BB tail -n 5 "$WORK/agent-$RUN.log" | while read -r line; do log "$line"; done
			AGENT_PID=
			return
		fi
	done
	check_self
	check_exec "$modes"
	stop_agent
	if [ -n "${MX_DUMP_LOGS:-}" ]; then
		while IFS= read -r line; do log "agent-log: $line"; done <"$WORK/agent-$RUN.log"
	fi
	# What the agent warned about (optional hooks that did not attach, fallbacks).
	$BB grep ' WARN ' "$WORK/agent-$RUN.log" | $BB sed 's/^[^ ]* *WARN *//' | $BB sort -u |
		$BB head -n 8 | while read -r line; do log "agent: $line"; done
	# Return probes made through tracefs must be gone once the agent stopped.
	events=/sys/kernel/tracing/kprobe_events
	if [ -r $events ] && $BB grep -q 'fleetsnitch/' $events; then
		say "MATRIX|$KERNEL|$RUN|cleanup|self|0|$($BB grep -c 'fleetsnitch/' $events)|FAIL|kprobe events left behind: $($BB grep 'fleetsnitch/' $events | $BB head -n 2 | $BB tr '\n' ' ')"
	fi
	DEFAULT_MODE=$(mode_of socket_send "$modes")
}

# --- main ----------------------------------------------------------------------------

log "kernel $(uname -r), work dir $WORK"
if ! setup_net; then
	say "MATRIX|$KERNEL|setup|network|-|-|-|FAIL|cannot create the namespaces and veth pair"
	exit 1
fi
if ! start_peer; then
	say "MATRIX|$KERNEL|setup|peer|-|-|-|FAIL|cannot start the peer server"
	exit 1
fi
DEFAULT_MODE=
agent_run default
for mode in $MODES; do
	[ "$mode" = "$DEFAULT_MODE" ] && continue
	agent_run "$mode"
done
say "MXDONE|$KERNEL|$(($($BB date +%s) - START))"
