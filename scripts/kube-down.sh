#!/usr/bin/env bash
# Stops the cluster scripts/kube-up.sh started and gives the host back as it found it: every
# process, container, mount, network namespace, the pods' cgroups, the CNI bridge, the firewall
# rules, the sysctls and the paths the node components created. The binary cache stays.
set -euo pipefail

STATE=/var/lib/headroom-kube
RUN=/run/headroom-kube
LOCK=/run/headroom-kube.lock
BRIDGE=hr-cni0

say() { echo "kube-down: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
flock -n 9 || { say "a kube-up or kube-down is running (lock $LOCK)"; exit 1; }

if [ ! -d "$STATE" ] && [ ! -d "$RUN" ]; then
  say "no cluster to stop"
  exit 0
fi

stop() { # stop NAME: TERM, then KILL after 10 s
  local file=$STATE/pids/$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

# The kubelet first, so nothing restarts what is stopped next; then every container.
stop kubelet
sock=$RUN/containerd/containerd.sock
if [ -S "$sock" ]; then
  for task in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
  done
  sleep 1
  for task in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io tasks delete -f "$task" >/dev/null 2>&1 || true
  done
  for c in $(ctr --address "$sock" -n k8s.io containers ls -q 2>/dev/null); do
    ctr --address "$sock" -n k8s.io containers delete "$c" >/dev/null 2>&1 || true
  done
fi
stop containerd
# Shims started by this containerd outlive it by design.
pkill -KILL -f "containerd-shim-runc-v2 .*-address $sock" 2>/dev/null || true
for name in kube-proxy kube-scheduler kube-controller-manager kube-apiserver etcd; do stop "$name"; done

# Processes left in the pods' cgroups (a container whose shim was killed), then the cgroups.
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/unified/kubepods; do
  [ -d "$root" ] || continue
  find "$root" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
done
sleep 0.5
for root in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods /sys/fs/cgroup/unified/kubepods; do
  [ -d "$root" ] || continue
  find "$root" -depth -type d -exec rmdir {} + 2>/dev/null || true
  [ -d "$root" ] && say "could not remove $root (processes still in it?)"
done

# Mounts under what the cluster used (deepest first), then the network namespaces.
awk '{print $5}' /proc/self/mountinfo | grep -E "^($STATE|$RUN|/var/lib/kubelet|/run/netns|/var/run/netns|/run/containerd)(/|$)" \
  | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
for ns in /run/netns/cni-*; do
  [ -e "$ns" ] || continue
  ip netns delete "$(basename "$ns")" 2>/dev/null || rm -f "$ns"
done
ip link delete "$BRIDGE" 2>/dev/null || true

# The firewall as it was: tables the snapshot has are restored whole; tables it lacks (kube-proxy
# and the CNI plugins created them) are emptied.
restore_firewall() { # restore_firewall iptables|ip6tables SNAPSHOT
  local cmd=$1 snapshot=$2 table
  [ -f "$snapshot" ] || return 0
  for table in filter nat mangle raw; do
    if grep -qx "\*$table" "$snapshot"; then
      sed -n "/^\*$table\$/,/^COMMIT\$/p" "$snapshot" | "$cmd-restore" 2>/dev/null \
        || say "could not restore the $cmd $table table"
    else
      "$cmd" -t "$table" -F 2>/dev/null || true
      "$cmd" -t "$table" -X 2>/dev/null || true
    fi
  done
}
restore_firewall iptables "$STATE/host/iptables"
restore_firewall ip6tables "$STATE/host/ip6tables"
if [ -f "$STATE/host/sysctl" ]; then
  while IFS= read -r kv; do sysctl -qw "$kv" 2>/dev/null || say "could not restore $kv"; done < "$STATE/host/sysctl"
fi
if [ -f "$STATE/host/created" ]; then
  while IFS= read -r path; do [ -n "$path" ] && rm -rf "$path"; done < "$STATE/host/created"
fi
rm -rf /var/lib/kubelet/pods /var/lib/kubelet/pod-resources /var/lib/kubelet/device-plugins 2>/dev/null || true
rm -rf "$STATE" "$RUN"
rm -f "$LOCK"
say "stopped; host restored"
