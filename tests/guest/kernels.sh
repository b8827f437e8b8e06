#!/usr/bin/env bash
# The kernel matrix: boots Debian's cloud kernels under software emulation (qemu TCG; KVM on these
# machines is nested PVM and hangs on a stock kernel) with a busybox initramfs that carries the
# agent, the in-guest check runner and their glibc libraries, and prints what the checks found.
#
#   tests/guest/kernels.sh fetch [SUITE...]     download and unpack the kernels (cached)
#   tests/guest/kernels.sh run SUITE [ARGS...]  boot one guest; ARGS go to the check runner
#   tests/guest/kernels.sh list                 the suites and the kernel each one resolves to
#
# SUITE is bullseye (5.10), bookworm (6.1) or trixie (6.12). Environment:
#   HEADROOM_KERNEL_CACHE  where kernels live (default /var/cache/headroom/kernels); never commit one
#   HEADROOM_BIN           the agent binary to carry (default target/release/headroom)
#   HEADROOM_GUEST_BIN     the check runner (default target/debug/headroom-guest)
#   HEADROOM_WORKLOAD_BIN  the test workloads (default: headroom-workload beside the runner)
#   GUEST_TIMEOUT          seconds before a guest is killed (default 240)
#
# `run` prints the guest's console; the check runner's results are the lines starting with
# `HEADROOM-GUEST `. It exits 0 when the guest ran to its end (whatever the checks found: the
# caller judges them), 1 when it did not (timeout, panic), 2 on bad usage.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cache="${HEADROOM_KERNEL_CACHE:-/var/cache/headroom/kernels}"
suites=(bullseye bookworm trixie)

die() { echo "kernels.sh: $1" >&2; exit "${2:-1}"; }

apt_opts() {
    echo "-o Dir::Etc::sourcelist=$cache/apt/sources.list -o Dir::Etc::sourceparts=-" \
        "-o Dir::State::Lists=$cache/apt/lists -o Dir::Cache=$cache/apt" \
        "-o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false" \
        "-o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false" \
        "-o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false" \
        "-o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false" \
        "-o APT::Sandbox::User=root"
}

check_suite() {
    case "$1" in
        bullseye | bookworm | trixie) ;;
        *) die "unknown suite '$1' (one of: ${suites[*]})" 2 ;;
    esac
}

# Writes the private sources list (Debian's own registry, these suites only; the machine's apt
# configuration is left alone) and refreshes its package lists when they are older than a day.
apt_update() {
    mkdir -p "$cache/apt/lists/partial" "$cache/apt/archives/partial"
    local list="$cache/apt/sources.list" keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || die "$keyring missing (apt-get install debian-archive-keyring)"
    : >"$list.new"
    for s in "${suites[@]}"; do
        echo "deb [signed-by=$keyring] http://deb.debian.org/debian $s main" >>"$list.new"
    done
    mv "$list.new" "$list"
    if [ -z "$(find "$cache/apt/lists" -maxdepth 1 -name '*_Packages' -mmin -1440 2>/dev/null | head -n1)" ]; then
        # shellcheck disable=SC2046
        apt-get $(apt_opts) update -qq >/dev/null || die "apt-get update of $list failed"
    fi
}

# The versioned kernel package the suite's linux-image-cloud-amd64 depends on today.
resolve() {
    # shellcheck disable=SC2046
    apt-cache $(apt_opts) show "linux-image-cloud-amd64/$1" 2>/dev/null |
        sed -n 's/^Depends: \(linux-image-[^ ,]*-cloud-amd64\).*/\1/p' | head -n1
}

# Downloads and unpacks a suite's kernel unless a vmlinuz for it is already cached.
fetch() {
    local suite="$1"
    check_suite "$suite"
    if [ -f "$cache/$suite/vmlinuz" ]; then
        return 0
    fi
    apt_update
    local pkg
    pkg="$(resolve "$suite")"
    [ -n "$pkg" ] || die "no linux-image-cloud-amd64 in $suite"
    local tmp
    tmp="$(mktemp -d "$cache/.fetch.XXXXXX")"
    # A failed download leaves no half-fetched folder in the cache.
    trap "rm -rf '$tmp'" EXIT
    # shellcheck disable=SC2046
    (cd "$tmp" && apt-get $(apt_opts) download -qq "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    dpkg-deb --fsys-tarfile "$tmp"/*.deb | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
    mkdir -p "$cache/$suite"
    mv "$tmp"/boot/vmlinuz-* "$cache/$suite/vmlinuz"
    echo "$pkg" >"$cache/$suite/package"
    rm -rf "$tmp"
    trap - EXIT
    echo "kernels.sh: $suite: $pkg cached in $cache/$suite" >&2
}

# Copies a binary and every library it loads (ldd) into the initramfs tree at the same paths.
carry() {
    local bin="$1" dest="$2" name="$3"
    install -D -m 0755 "$bin" "$dest/bin/$name"
    local lib
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        [ -e "$dest$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$dest$lib"
    done
}

build_initramfs() {
    local out="$1" tree
    local agent="${HEADROOM_BIN:-$root/target/release/headroom}"
    local runner="${HEADROOM_GUEST_BIN:-$root/target/debug/headroom-guest}"
    [ -x "$agent" ] || die "agent binary $agent missing (cargo build --release -p headroom)"
    local workload="${HEADROOM_WORKLOAD_BIN:-$(dirname "$runner")/headroom-workload}"
    [ -x "$runner" ] || die "check runner $runner missing (cargo build -p headroom-tests --bin headroom-guest)"
    [ -x "$workload" ] || die "workloads $workload missing (cargo build -p headroom-tests --bin headroom-workload)"
    local busybox
    busybox="$(command -v busybox)" || die "busybox missing (apt-get install busybox-static)"
    ldd "$busybox" >/dev/null 2>&1 && die "$busybox is dynamically linked (apt-get install busybox-static)"
    tree="$(mktemp -d)"
    mkdir -p "$tree"/{bin,dev,proc,sys,tmp,run,var/lib/headroom}
    install -m 0755 "$busybox" "$tree/bin/busybox"
    install -m 0755 "$here/init.sh" "$tree/init"
    carry "$agent" "$tree" headroom
    carry "$runner" "$tree" headroom-guest
    carry "$workload" "$tree" headroom-workload
    (cd "$tree" && find . | cpio -o -H newc --quiet | gzip -1 >"$out")
    rm -rf "$tree"
}

run() {
    local suite="$1"
    shift
    check_suite "$suite"
    fetch "$suite"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
    command -v cpio >/dev/null || die "cpio missing (apt-get install cpio)"
    local initrd
    initrd="$(mktemp --suffix=.cpio.gz)"
    trap 'rm -f "$initrd"' RETURN
    build_initramfs "$initrd"
    local status=0 log
    log="$(mktemp)"
    # Arguments for the check runner travel on the kernel command line after `--`.
    # One TCG thread runs both vCPUs in turn: with a thread per vCPU on a busy 2-core host, a
    # vCPU waiting on the other (text patching when probes attach, IPIs) was seen stalled past
    # the soft-lockup watchdog on 5.10 and hitting a half-patched int3 in __schedule on 6.12.
    timeout --foreground -k 5 "${GUEST_TIMEOUT:-240}" qemu-system-x86_64 -accel tcg,thread=single -cpu max -m 1024 -smp 2 \
        -kernel "$cache/$suite/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 quiet panic=-1 oops=panic -- $*" \
        -nographic -no-reboot -monitor none -serial stdio </dev/null | tee "$log" || status=$?
    if ! grep -q '^HEADROOM-GUEST-END' "$log"; then
        echo "kernels.sh: the $suite guest did not run to its end (qemu status $status)" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

case "${1:-}" in
    fetch)
        shift
        for s in "${@:-${suites[@]}}"; do fetch "$s"; done
        ;;
    list)
        apt_update
        for s in "${suites[@]}"; do echo "$s $(resolve "$s")"; done
        ;;
    run)
        [ $# -ge 2 ] || die "usage: $0 run SUITE [ARGS...]" 2
        shift
        run "$@"
        ;;
    *)
        die "usage: $0 fetch [SUITE...] | list | run SUITE [ARGS...]" 2
        ;;
esac
