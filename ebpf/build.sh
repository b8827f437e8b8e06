#!/usr/bin/env bash
# Compiles bpf/headroom.bpf.c into the committed bpf/headroom.bpf.o that the headroom-ebpf crate
# embeds, so building the agent never needs clang.
#
#   ebpf/build.sh           recompile and overwrite bpf/headroom.bpf.o
#   ebpf/build.sh --check   recompile into a temporary file and fail if it differs from the
#                           committed object (CI runs this)
#
# The output is reproducible: no vmlinux.h from the build machine (bpf/kernel_types.h is written by
# hand, CO-RE fixes offsets at load time), paths are mapped away and DWARF is stripped (BTF, which
# the loader needs, stays). Needs clang and llvm-strip (Debian: clang) and libbpf-dev's headers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/bpf/headroom.bpf.c"
committed="$here/bpf/headroom.bpf.o"

CLANG="${CLANG:-clang}"
STRIP="${LLVM_STRIP:-llvm-strip}"
for tool in "$CLANG" "$STRIP"; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool not found (apt-get install clang)" >&2; exit 127; }
done
[ -f /usr/include/bpf/bpf_helpers.h ] || { echo "build.sh: /usr/include/bpf/bpf_helpers.h missing (apt-get install libbpf-dev)" >&2; exit 127; }

compile() {
    local out="$1"
    (cd "$here/bpf" && "$CLANG" -O2 -g -target bpf -D__TARGET_ARCH_x86 \
        -Wall -Werror \
        -fdebug-prefix-map="$here/bpf"=. -fdebug-compilation-dir=. \
        -I. -c headroom.bpf.c -o "$out")
    # DWARF carries the compiler's version string and paths; only .BTF/.BTF.ext are needed.
    "$STRIP" --strip-debug "$out"
}

case "${1:-}" in
    --check)
        tmp="$(mktemp --suffix=.bpf.o)"
        trap 'rm -f "$tmp"' EXIT
        compile "$tmp"
        if cmp -s "$tmp" "$committed"; then
            echo "build.sh --check: $committed matches a fresh compile of $src ($("$CLANG" --version | head -n1))"
        else
            echo "build.sh --check: $committed differs from a fresh compile of $src; run ebpf/build.sh and commit the object" >&2
            exit 1
        fi
        ;;
    "")
        compile "$committed"
        echo "build.sh: wrote $committed ($(stat -c %s "$committed") bytes)"
        ;;
    *)
        echo "usage: $0 [--check]" >&2
        exit 2
        ;;
esac
