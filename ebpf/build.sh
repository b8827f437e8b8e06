#!/usr/bin/env bash
# Compiles bpf/headroom.bpf.c into the committed objects that the headroom-ebpf crate embeds, so
# building the agent never needs clang: bpf/headroom.bpf.o (socket/task local storage for the
# tp_btf programs) and bpf/headroom_compat.bpf.o (-DHEADROOM_COMPAT: hash maps only, for kernels
# without local-storage map types).
#
#   ebpf/build.sh           recompile and overwrite both objects
#   ebpf/build.sh --check   recompile into temporary files and fail if either differs from the
#                           committed one (CI runs this)
#
# The output is reproducible: no vmlinux.h from the build machine (bpf/kernel_types.h is written by
# hand, CO-RE fixes offsets at load time), paths are mapped away and DWARF is stripped (BTF, which
# the loader needs, stays). Needs clang, llvm-strip and libbpf's headers (Debian: clang llvm
# libbpf-dev).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/bpf/headroom.bpf.c"
# object file name, extra clang flags
objects=("headroom.bpf.o:" "headroom_compat.bpf.o:-DHEADROOM_COMPAT")

CLANG="${CLANG:-clang}"
STRIP="${LLVM_STRIP:-llvm-strip}"
for tool in "$CLANG" "$STRIP"; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install clang llvm)" >&2; exit 127; }
done
[ -f /usr/include/bpf/bpf_helpers.h ] || { echo "build.sh: /usr/include/bpf/bpf_helpers.h missing (apt-get install libbpf-dev)" >&2; exit 127; }

compile() {
    local out="$1" extra="$2"
    (cd "$here/bpf" && "$CLANG" -O2 -g -target bpf -D__TARGET_ARCH_x86 $extra \
        -Wall -Werror \
        -fdebug-prefix-map="$here/bpf"=. -fdebug-compilation-dir=. \
        -I. -c headroom.bpf.c -o "$out")
    # DWARF carries the compiler's version string and paths; only .BTF/.BTF.ext are needed.
    "$STRIP" --strip-debug "$out"
}

case "${1:-}" in
    --check)
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        status=0
        for spec in "${objects[@]}"; do
            name="${spec%%:*}"
            compile "$tmp/$name" "${spec#*:}"
            if cmp -s "$tmp/$name" "$here/bpf/$name"; then
                echo "build.sh --check: bpf/$name matches a fresh compile of $src ($("$CLANG" --version | head -n1))"
            else
                echo "build.sh --check: bpf/$name differs from a fresh compile of $src; run ebpf/build.sh and commit it" >&2
                status=1
            fi
        done
        exit "$status"
        ;;
    "")
        for spec in "${objects[@]}"; do
            name="${spec%%:*}"
            compile "$here/bpf/$name" "${spec#*:}"
            echo "build.sh: wrote bpf/$name ($(stat -c %s "$here/bpf/$name") bytes)"
        done
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
