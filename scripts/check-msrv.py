#!/usr/bin/env python3
"""Checks, offline and in seconds, what can be checked about `rust-version` without its toolchain.

- Every workspace member inherits one `rust-version`.
- No package Cargo.lock resolves for this host asks for a newer compiler (`cargo metadata`).
- clippy.toml sets no other `msrv`: clippy reads `rust-version` from Cargo.toml for its
  `incompatible_msrv` lint (standard-library items stabilised later), which `clippy -D warnings`
  in .ci/run turns into errors; an `msrv` in clippy.toml would silently win over it (clippy only
  warns when the two differ, and that warning passes `-D warnings`).
- `rust-version` is at least the floor of the language features the code is known to use, below.

Language features are what clippy cannot see; only the toolchain itself can. After raising the
floor or using a newer language feature, check by hand:
`cargo +<rust-version> check --workspace --all-targets --locked` (a rustup download, then a full
check build).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

# (version, why): language features that need at least this compiler.
LANGUAGE_FLOOR = [
    ((1, 85), "edition 2024"),
    ((1, 88), "let chains (`if a && let Some(x) = b`), stable from 1.88 in edition 2024"),
]


def version(v):
    return tuple(int(p) for p in v.split(".")[:2])


def main():
    root = Path(__file__).resolve().parent.parent
    host = next(
        line.split(":", 1)[1].strip()
        for line in subprocess.run(
            ["rustc", "-vV"], check=True, capture_output=True, text=True
        ).stdout.splitlines()
        if line.startswith("host:")
    )
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--locked", "--offline", "--format-version", "1",
             "--filter-platform", host],
            cwd=root, check=True, capture_output=True, text=True,
        ).stdout
    )
    members = set(meta["workspace_members"])
    packages = {p["id"]: p for p in meta["packages"]}
    ours = {packages[m].get("rust_version") for m in members}
    errors = []
    if len(ours) != 1 or None in ours:
        errors.append(f"workspace members disagree on rust-version: {sorted(map(str, ours))}")
        print("\n".join(errors), file=sys.stderr)
        return 1
    msrv = ours.pop()
    resolved = {n["id"] for n in meta["resolve"]["nodes"]} - members
    deps = sorted(
        ((version(packages[i]["rust_version"]), packages[i]["name"], packages[i]["version"])
         for i in resolved if packages[i].get("rust_version")),
        reverse=True,
    )
    for v, name, ver in deps:
        if v > version(msrv):
            errors.append(f"{name} {ver} needs Rust {v[0]}.{v[1]}, above rust-version {msrv}")
    for v, why in LANGUAGE_FLOOR:
        if v > version(msrv):
            errors.append(f"rust-version {msrv} is below {v[0]}.{v[1]}, needed for {why}")
    clippy = root / "clippy.toml"
    if clippy.is_file():
        m = re.search(r'^\s*msrv\s*=\s*"?([0-9.]+)"?', clippy.read_text(), re.MULTILINE)
        if m and version(m.group(1)) != version(msrv):
            errors.append(f"clippy.toml msrv {m.group(1)} differs from rust-version {msrv}")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    top = deps[0] if deps else None
    print(f"rust-version {msrv}: {len(resolved)} resolved dependencies need at most "
          + (f"{top[0][0]}.{top[0][1]} ({top[1]} {top[2]})" if top else "nothing")
          + f"; language floor {'.'.join(map(str, max(LANGUAGE_FLOOR)[0]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
