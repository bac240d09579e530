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
#   MXRUN|kernel|mode|healthy|<seconds>                  the agent answered /healthz
#   MXRUN|kernel|mode|attached|probe=mode,...            agent started, modes seen
#   MXRUN|kernel|mode|refused|<verdict>|<agent message>  agent refused to start
#   MATRIX|kernel|mode|scenario|part|expected|seen|diff|verdict|note
#     part: sent / received (the client copy against what it counted itself),
#     peer_sent / peer_received (the peer server's copy against what its own socket
#     calls returned during the scenario), self (agent self-checks). diff = seen -
#     expected, or - where the row is not a count.
#   MXLOG|kernel|mode|text                              diagnostics
# and MXDONE|kernel|seconds at the end. Every check prints its row, PASS or FAIL:
# a row that is missing means the check did not run (tests/tests/kernel_matrix.rs
# knows which rows each run must produce).
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
#   MX_STOP        seconds the agent gets to stop after SIGTERM (default 60)
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
# Detaching the probes is the slow part of a stop under emulation: 0.9/1.8/3.0 s
# (min/median/max) on a quiet 5.10 guest, 7.5/11.7/16.6 s on a CPU-starved one, spent
# in the kernel's probe unregistration (synchronize_rcu), not in the agent. 60 s is
# more than three times the worst of those.
STOP=${MX_STOP:-60}
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
	exec 3>&-
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

# The server reads its stdin from a FIFO the checks hold open on fd 3: each `stats`
# line written there makes it print what its own socket calls returned so far.
# Opened read-write, so the open never blocks, whether the server got that far or not.
start_peer() {
	PEER_EXE=$(copy_exe peer) || return 1
	$BB mkfifo "$WORK/peer.in" || return 1
	exec 3<>"$WORK/peer.in"
	$IP netns exec "$PEER" "$PEER_EXE" serve --v4 $PEER_V4 --v6 $PEER_V6 \
		>"$WORK/peer.out" 2>"$WORK/peer.err" <"$WORK/peer.in" &
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

# json_field NAME LINE: the unsigned integer field NAME of a one-line JSON object.
json_field() {
	echo "$2" | $BB sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"
}

# peer_stats: SERVER_SENT and SERVER_RECEIVED, what the peer server's own socket
# calls returned so far (its answer to one `stats` line).
peer_stats() {
	n0=$($BB grep -c '^{' "$WORK/peer.out")
	# In a subshell: were the server gone, SIGPIPE would end that, not the checks.
	(echo stats >&3) 2>/dev/null || return 1
	i=0
	while [ $i -lt 100 ]; do
		if [ "$($BB grep -c '^{' "$WORK/peer.out")" -gt "$n0" ]; then
			line=$($BB grep '^{' "$WORK/peer.out" | $BB tail -n 1)
			SERVER_SENT=$(json_field sent "$line")
			SERVER_RECEIVED=$(json_field received "$line")
			[ -n "$SERVER_SENT" ] && [ -n "$SERVER_RECEIVED" ]
			return
		fi
		$BB sleep 0.1
		i=$((i + 1))
	done
	return 1
}

# count_row SCENARIO PART EXPECTED SEEN NOTE: one count, which must be exact; the row
# carries expected, seen and their difference whatever the verdict.
count_row() {
	v=FAIL d=-
	if [ "$3" -eq "$3" ] 2>/dev/null && [ "$4" -eq "$4" ] 2>/dev/null; then
		d=$(($4 - $3))
		[ "$d" -eq 0 ] && v=PASS
	fi
	say "MATRIX|$KERNEL|$RUN|$1|$2|$3|$4|$d|$v|$5"
}

# uptime_cs: the guest's (or host's) uptime in hundredths of a second.
uptime_cs() {
	$BB awk '{ printf "%.0f\n", $1 * 100 }' /proc/uptime
}

# secs_since CENTISECONDS: seconds since that uptime, two decimals.
secs_since() {
	$BB awk -v t0="$1" '{ printf "%.2f\n", $1 - t0 / 100 }' /proc/uptime
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
	t0=$(uptime_cs)
	t=0
	while [ $t -lt $((STARTUP * 2)) ]; do
		if ! kill -0 "$AGENT_PID" 2>/dev/null; then
			wait "$AGENT_PID"
			AGENT_RC=$?
			AGENT_PID=
			return 1
		fi
		if $IP netns exec "$CLI" $BB timeout 5 $BB wget -q -O /dev/null "http://$LISTEN/healthz" 2>/dev/null; then
			# The host retries a guest only if no agent got this far (scripts/kernel-matrix.sh).
			say "MXRUN|$KERNEL|$1|healthy|$(secs_since "$t0")"
			return 0
		fi
		$BB sleep 0.5
		t=$((t + 1))
	done
	return 2
}

# stop_agent [ROW]: SIGTERM, then up to $STOP s for the agent to exit by itself
# (SIGKILL after that). With ROW, prints the shutdown row: the agent must exit with
# status 0 within the bound; the time it took is in the note.
stop_agent() {
	[ -n "$AGENT_PID" ] || return 0
	t0=$(uptime_cs)
	kill -TERM "$AGENT_PID" 2>/dev/null
	i=0
	# The shell reaps the exited agent while it waits for each sleep, so kill -0
	# stops succeeding once it is gone.
	while kill -0 "$AGENT_PID" 2>/dev/null && [ $i -lt $((STOP * 5)) ]; do
		$BB sleep 0.2
		i=$((i + 1))
	done
	took=$(secs_since "$t0")
	killed=
	kill -0 "$AGENT_PID" 2>/dev/null && killed=1
	kill -KILL "$AGENT_PID" 2>/dev/null
	wait "$AGENT_PID" 2>/dev/null
	rc=$?
	AGENT_PID=
	[ -n "${1:-}" ] || return 0
	if [ -n "$killed" ]; then
		say "MATRIX|$KERNEL|$RUN|shutdown|self|0|killed|-|FAIL|still running ${STOP}s after SIGTERM; killed"
	elif [ "$rc" -ne 0 ]; then
		say "MATRIX|$KERNEL|$RUN|shutdown|self|0|$rc|-|FAIL|exit status $rc ${took}s after SIGTERM"
	else
		say "MATRIX|$KERNEL|$RUN|shutdown|self|0|0|-|PASS|exit status 0 ${took}s after SIGTERM"
	fi
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

# snapshot EXE: one scrape of /metrics and one reading of the peer server's own counts.
# Sets SEEN_SENT/SEEN_RECEIVED (what /metrics attributes to EXE), SEEN_PEER_SENT/
# SEEN_PEER_RECEIVED (to the peer server's copy) and SERVER_SENT/SERVER_RECEIVED.
snapshot() {
	scrape || return 1
	peer_stats || return 1
	SEEN_SENT=$(bytes_of "$1" sent)
	SEEN_RECEIVED=$(bytes_of "$1" received)
	SEEN_PEER_SENT=$(bytes_of "$PEER_EXE" sent)
	SEEN_PEER_RECEIVED=$(bytes_of "$PEER_EXE" received)
}

# scenario_failed REASON: the four rows of a scenario that could not be measured.
scenario_failed() {
	for part in sent received peer_sent peer_received; do
		say "MATRIX|$KERNEL|$RUN|$scenario|$part|-|-|-|FAIL|$1"
	done
}

# baseline EXE: snapshot before a scenario; the peer server's counts are judged as
# differences from here.
baseline() {
	snapshot "$1" || return 1
	peer_sent0=$SEEN_PEER_SENT peer_recv0=$SEEN_PEER_RECEIVED
	server_sent0=$SERVER_SENT server_recv0=$SERVER_RECEIVED
	SENT=0 RECEIVED=0
}

# client EXE SCENARIO ARG...: one trafficgen client in the client namespace; what it
# counted itself is added to SENT and RECEIVED. 1, with ERR, if it failed.
client() {
	c_exe=$1 c_scenario=$2
	shift 2
	$IP netns exec "$CLI" $BB timeout 300 "$c_exe" client "$c_scenario" --peer-v4 $PEER_V4 \
		--peer-v6 $PEER_V6 "$@" >"$WORK/client.out" 2>"$WORK/client.err" </dev/null
	rc=$?
	json=$($BB grep '^{' "$WORK/client.out" | $BB tail -n 1)
	c_sent=$(json_field sent "$json")
	c_received=$(json_field received "$json")
	if [ $rc -ne 0 ] || [ -z "$c_sent" ] || [ -z "$c_received" ]; then
		ERR="trafficgen $c_scenario failed (exit $rc): $($BB tail -n 2 "$WORK/client.err" | $BB tr '\n|' '  ')"
		return 1
	fi
	SENT=$((SENT + c_sent)) RECEIVED=$((RECEIVED + c_received))
}

# Whether the last snapshot shows every byte: the client's copy exactly as counted,
# the peer server's exactly as the server counted since the baseline.
all_seen() {
	[ "$SEEN_SENT" = "$SENT" ] && [ "$SEEN_RECEIVED" = "$RECEIVED" ] &&
		[ $((SEEN_PEER_SENT - peer_sent0)) = $((SERVER_SENT - server_sent0)) ] &&
		[ $((SEEN_PEER_RECEIVED - peer_recv0)) = $((SERVER_RECEIVED - server_recv0)) ]
}

# settle EXE CONDITION: snapshots until CONDITION (a function) holds or 30 s passed,
# then one more drain interval and the snapshot the rows are judged on. /metrics must
# show traffic within 2 s; 30 s is for emulation (by the clock: one snapshot forks a
# dozen processes, slow under TCG); the drain interval shows nothing more arrives.
settle() {
	deadline=$(($(uptime_cs) + 3000))
	while [ "$(uptime_cs)" -lt $deadline ]; do
		$BB sleep 0.5
		snapshot "$1" || continue
		if $2; then
			$BB sleep 1.5
			break
		fi
	done
	snapshot "$1"
}

# Four rows per scenario, all exact: what /metrics attributes to the client's copy
# against what that copy counted itself, and what it attributes to the peer server's
# copy during the scenario against what the server's own calls returned meanwhile (0
# for a scenario that never reaches the peer). Program and agent count the return
# values of the same socket calls, so a difference of one byte is a failure. The
# server counts itself rather than mirroring the client: a UDP echo that arrives
# after a short-lived child gave up is sent by the server and received by nobody.
run_scenario() {
	scenario=$1
	exe=$(copy_exe "$scenario") || {
		scenario_failed "cannot copy trafficgen"
		return
	}
	if ! baseline "$exe"; then
		scenario_failed "no /metrics or no peer server stats before the scenario"
		return
	fi
	# shellcheck disable=SC2046 # word splitting of the size arguments is wanted
	if ! client "$exe" "$scenario" $(scenario_args "$scenario"); then
		scenario_failed "$ERR"
		return
	fi
	# short_lived's children execute the copy again; every other copy runs once.
	[ "$scenario" = short_lived ] || ONCE_EXE=$exe
	if ! settle "$exe" all_seen; then
		scenario_failed "no /metrics or no peer server stats after the scenario"
		return
	fi
	name=$(basename "$exe")
	peer=$(basename "$PEER_EXE")
	count_row "$scenario" sent "$SENT" "$SEEN_SENT" "$name"
	count_row "$scenario" received "$RECEIVED" "$SEEN_RECEIVED" "$name"
	count_row "$scenario" peer_sent $((SERVER_SENT - server_sent0)) $((SEEN_PEER_SENT - peer_sent0)) "$peer"
	count_row "$scenario" peer_received $((SERVER_RECEIVED - server_recv0)) $((SEEN_PEER_RECEIVED - peer_recv0)) "$peer"
}

# The receive calls in flight when the agent attached. The peer server was started
# before the agent, and each of its UDP services has a thread blocked in recvfrom
# when the probes attach. fexit and kprobe modes count a call at its return, from a
# program the call must have entered through (a BPF trampoline, a kretprobe's
# return hook): a call that began before the attach returns without it and is not
# counted (the tp_btf mode's tracepoint fires at the return wherever the call began).
# So before the scenarios, each UDP service the scenarios use (echo, sink, source)
# receives two datagrams: the first completes the call in flight, the second must be
# counted. The peer_received row allows, in those two modes only, the first datagram
# of each service to be missing (2 x 100 + 8 bytes at most) and nothing else;
# every other row of this check is exact.
IN_FLIGHT_MISS=208
in_flight_seen() {
	[ "$SEEN_SENT" = "$SENT" ] && [ "$SEEN_RECEIVED" = "$RECEIVED" ] &&
		[ $((SERVER_RECEIVED - server_recv0)) = 416 ] &&
		[ $((SEEN_PEER_SENT - peer_sent0)) = $((SERVER_SENT - server_sent0)) ]
}
check_in_flight() {
	scenario=in_flight
	exe=$(copy_exe in_flight) || {
		scenario_failed "cannot copy trafficgen"
		return
	}
	if ! baseline "$exe"; then
		scenario_failed "no /metrics or no peer server stats before the check"
		return
	fi
	# 2 x 100 bytes to the echo service and back, 2 x 100 to the sink, and twice an
	# 8-byte request to the source (which sends one 100-byte datagram back each time).
	if ! client "$exe" udp_both --bytes 200 --count 2 || ! client "$exe" sendmmsg --bytes 200 --count 2 ||
		! client "$exe" recvmmsg --bytes 100 --count 1 || ! client "$exe" recvmmsg --bytes 100 --count 1; then
		scenario_failed "$ERR"
		return
	fi
	if ! settle "$exe" in_flight_seen; then
		scenario_failed "no /metrics or no peer server stats after the check"
		return
	fi
	name=$(basename "$exe")
	peer=$(basename "$PEER_EXE")
	count_row in_flight sent "$SENT" "$SEEN_SENT" "$name"
	count_row in_flight received "$RECEIVED" "$SEEN_RECEIVED" "$name"
	count_row in_flight peer_sent $((SERVER_SENT - server_sent0)) $((SEEN_PEER_SENT - peer_sent0)) "$peer"
	e=$((SERVER_RECEIVED - server_recv0)) r=$((SEEN_PEER_RECEIVED - peer_recv0))
	case $(mode_of socket_receive "$1") in
	fexit | kprobe)
		d=$((r - e)) v=FAIL
		[ $d -le 0 ] && [ $d -ge -$IN_FLIGHT_MISS ] && v=PASS
		say "MATRIX|$KERNEL|$RUN|in_flight|peer_received|$e|$r|$d|$v|$peer; $(mode_of socket_receive "$1") mode: calls in flight at attach may be missed, diff allowed -$IN_FLIGHT_MISS..0"
		;;
	*) count_row in_flight peer_received "$e" "$r" "$peer" ;;
	esac
}

# The rows every run that attached ends with, PASS or FAIL, so that a check that
# could not run is a FAIL row rather than a missing one.

# Self-metrics that must stay at zero: anything else means bytes were not attributed.
check_self() {
	if ! scrape; then
		say "MATRIX|$KERNEL|$RUN|self_metrics|self|0|-|-|FAIL|cannot scrape /metrics"
		return
	fi
	bad= total=0
	for m in fleetsnitch_unresolved_bytes_total fleetsnitch_unattributed_bytes_total \
		fleetsnitch_events_lost_total fleetsnitch_map_full_total fleetsnitch_drain_errors_total \
		fleetsnitch_exec_events_lost_total; do
		v=$(metric_sum $m)
		[ "$v" = 0 ] || bad="$bad $m=$v"
		total=$((total + v))
	done
	if [ -z "$bad" ]; then
		say "MATRIX|$KERNEL|$RUN|self_metrics|self|0|0|0|PASS|unresolved, unattributed, lost, map full, drain errors, exec events lost"
	else
		say "MATRIX|$KERNEL|$RUN|self_metrics|self|0|$total|$total|FAIL|$bad"
	fi
}

# Exec tracking: its probe attached, and the copy of trafficgen the last scenario
# executed once is counted exactly once in fleetsnitch_exec_total.
check_exec() {
	mode=$(mode_of process_exec "$1")
	if [ -z "$mode" ]; then
		say "MATRIX|$KERNEL|$RUN|exec_tracking|self|1|-|-|FAIL|the process_exec probe did not attach"
		return
	fi
	if [ -z "${ONCE_EXE:-}" ]; then
		say "MATRIX|$KERNEL|$RUN|exec_tracking|self|1|-|-|FAIL|no scenario other than short_lived ran, nothing was executed exactly once"
		return
	fi
	if ! scrape; then
		say "MATRIX|$KERNEL|$RUN|exec_tracking|self|1|-|-|FAIL|cannot scrape /metrics"
		return
	fi
	n=$($BB awk -v want="exe=\"$ONCE_EXE\"" '/^fleetsnitch_exec_total\{/ && index($0, want) { sum += $NF }
		END { printf "%.0f\n", sum }' "$WORK/metrics")
	count_row exec_tracking self 1 "$n" "process_exec in mode $mode; execs of $(basename "$ONCE_EXE")"
}

# Return probes made through tracefs must be gone once the agent stopped. A kernel
# without kprobes has no kprobe_events file; the kprobe mode cannot have attached there.
check_kprobe_events() {
	events=/sys/kernel/tracing/kprobe_events
	if [ ! -r $events ]; then
		if [ "$(mode_of socket_send "$1")" = kprobe ]; then
			say "MATRIX|$KERNEL|$RUN|cleanup|self|0|-|-|FAIL|the kprobe mode attached but $events is not readable"
		else
			say "MATRIX|$KERNEL|$RUN|cleanup|self|0|0|0|PASS|no $events (no kprobes on this kernel)"
		fi
		return
	fi
	n=$($BB grep -c 'fleetsnitch/' $events)
	if [ "$n" = 0 ]; then
		say "MATRIX|$KERNEL|$RUN|cleanup|self|0|0|0|PASS|no fleetsnitch kprobe event left in $events"
	else
		say "MATRIX|$KERNEL|$RUN|cleanup|self|0|$n|$n|FAIL|kprobe events left behind: $($BB grep 'fleetsnitch/' $events | $BB head -n 2 | $BB tr '\n|' ' /')"
	fi
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
	[ "$RUN" = default ] && DEFAULT_MODE=$(mode_of socket_send "$modes")
	# The log must say the same as /metrics, and a forced mode must be the one used.
	for probe in socket_send socket_receive; do
		m=$(mode_of $probe "$modes")
		want=any
		[ "$RUN" = default ] || want=$RUN
		v=PASS note="the log agrees"
		if ! $BB grep "probe attached" "$WORK/agent-$RUN.log" | $BB tr -d '"' |
			$BB grep "probe=$probe " | $BB grep -q "mode=$m\$"; then
			v=FAIL note="the log does not report $probe in mode ${m:-(none)}"
		fi
		if [ -z "$m" ] || { [ "$want" != any ] && [ "$m" != "$want" ]; }; then
			v=FAIL note="$note; forced mode not used"
		fi
		say "MATRIX|$KERNEL|$RUN|attach|$probe|$want|${m:--}|-|$v|$note"
	done
	if [ "$RUN" != default ] && [ "$(expected_for "$RUN")" = refuse ]; then
		say "MATRIX|$KERNEL|$RUN|attach|expectation|refuse|$RUN|-|FAIL|expected this kernel to refuse $RUN"
	fi
	check_in_flight "$modes"
	for scenario in $SCENARIOS; do
		run_scenario "$scenario"
		if ! kill -0 "$AGENT_PID" 2>/dev/null; then
			say "MATRIX|$KERNEL|$RUN|agent|self|running|exited|-|FAIL|the agent died during $scenario"
			$BB tail -n 5 "$WORK/agent-$RUN.log" | while read -r line; do log "$line"; done
			AGENT_PID=
			return
		fi
	done
	check_self
	check_exec "$modes"
	stop_agent row
	check_kprobe_events "$modes"
	if [ -n "${MX_DUMP_LOGS:-}" ]; then
		while IFS= read -r line; do log "agent-log: $line"; done <"$WORK/agent-$RUN.log"
	fi
	# What the agent warned about (optional hooks that did not attach, fallbacks).
	$BB grep ' WARN ' "$WORK/agent-$RUN.log" | $BB sed 's/^[^ ]* *WARN *//' | $BB sort -u |
		$BB head -n 8 | while read -r line; do log "agent: $line"; done
}

# --- main ----------------------------------------------------------------------------

log "kernel $(uname -r), work dir $WORK"
if ! setup_net; then
	say "MATRIX|$KERNEL|setup|network|-|-|-|-|FAIL|cannot create the namespaces and veth pair"
	exit 1
fi
if ! start_peer; then
	say "MATRIX|$KERNEL|setup|peer|-|-|-|-|FAIL|cannot start the peer server"
	exit 1
fi
DEFAULT_MODE=
agent_run default
for mode in $MODES; do
	[ "$mode" = "$DEFAULT_MODE" ] && continue
	agent_run "$mode"
done
say "MXDONE|$KERNEL|$(($($BB date +%s) - START))"
