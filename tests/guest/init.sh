#!/bin/busybox sh
# /init of the kernel-matrix guest (tests/guest/kernels.sh): a pure cgroup v2 system with only
# loopback networking, running the check runner once with the arguments the kernel passed after
# `--` on its command line, then powering off. The host reads the lines between
# HEADROOM-GUEST-START and HEADROOM-GUEST-END.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
ip link set lo up
# Every controller the kernel offers, for the children the checks create.
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done
echo "HEADROOM-GUEST-START kernel=$(uname -r) controllers=$(cat /sys/fs/cgroup/cgroup.subtree_control | tr ' ' ,)"
HEADROOM_BIN=/bin/headroom /bin/headroom-guest "$@"
rc=$?
# Kernel warnings the checks provoked (the console is quiet, so they are only in the ring buffer).
dmesg | grep -A2 -E "WARNING:|BUG:" | sed 's/^/HEADROOM-GUEST-DMESG /' | head -n 30
echo "HEADROOM-GUEST-END rc=$rc"
poweroff -f
