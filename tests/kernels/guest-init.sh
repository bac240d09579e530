#!/bin/busybox sh
# /init of the kernel-matrix initramfs (built by scripts/kernel-matrix.sh): mounts
# what the agent and the checks need (as a booted system has them), loads the veth module the cloud kernels
# build as a module, runs checks.sh with the settings in /matrix/env, and powers
# the machine off. Everything the host needs comes out on the serial console as
# lines starting with MX or MATRIX.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /var
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t tmpfs -o mode=1777 tmpfs /tmp
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox ln -sfn /run /var/run
/bin/busybox mount -t bpf bpf /sys/fs/bpf 2>/dev/null
/bin/busybox mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
/bin/busybox mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
/bin/busybox mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
export PATH=/bin:/usr/bin
# Keep kernel messages off the console: the host parses it line by line.
echo 1 >/proc/sys/kernel/printk

. /matrix/env
echo "MXBOOT|$MX_KERNEL|$(uname -r)|$(cut -d' ' -f1 /proc/uptime)s"

for module in /matrix/modules/*.ko; do
	[ -e "$module" ] || continue
	insmod "$module" || echo "MXLOG|$MX_KERNEL|setup|insmod $module failed"
done
ip=/usr/bin/ip
[ -e /sys/kernel/btf/vmlinux ] || echo "MXLOG|$MX_KERNEL|setup|no /sys/kernel/btf/vmlinux"

export MX_KERNEL MX_MODES MX_EXPECT MX_SCENARIOS MX_SCALE MX_STARTUP MX_DUMP_LOGS
MX_AGENT=/usr/bin/fleetsnitch MX_TRAFFICGEN=/usr/bin/trafficgen MX_BUSYBOX=/bin/busybox \
	MX_IP=$ip /bin/busybox sh /matrix/checks.sh
# The exit marker: the host requires it (with status 0) as well as qemu's own exit
# status, so a guest that hangs after its checks, or panics and reboots (which
# -no-reboot turns into qemu exiting 0), fails.
echo "MXEXIT|$MX_KERNEL|$?"
sync
poweroff -f
