#!/usr/bin/env python3
"""Fails when the modules of a crate depend on each other in a cycle, and prints the cycle.

Data flows one way through the agent (ARCHITECTURE: samplers -> history -> forecasters -> policy
-> actuators -> reporter), so no module may reach back into one that reaches it. The check is
offline, needs no compiler and runs in well under a second.

For every crate of the workspace (the `src/lib.rs` or `src/main.rs` of each member), the module
tree is read from its `mod` declarations, and every path a module names is resolved: `use` trees
and paths in code starting with `crate::`, `super::`, `self::`, or a child module's name. A
reference from module A to an item of module B is a dependency between the two children of their
closest common ancestor that hold A and B (siblings depend on siblings; a parent using its child,
or a child using its parent, is containment, not a dependency). A cycle among the children of any
module fails the check.

Test code (`#[cfg(test)]` items and modules) is left out: nothing depends on a test, so what a
test reaches for is not a dependency of the module it sits in. Paths are read from the text after
comments and string literals are blanked, so a path in a doc comment or a message never counts; a
path hidden inside a macro's own syntax is read like code.

Usage: scripts/check-module-cycles.py [CRATE_SRC_ROOT_FILE ...]  (default: every workspace member)
"""

import re
import sys
import tomllib
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def blank(text):
    """Comments and string/char literals replaced by spaces; offsets and newlines kept."""
    out = list(text)
    i, n = 0, len(text)

    def wipe(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            wipe(i, j)
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            wipe(i, j)
            i = j
        elif (m := re.compile(r'b?r(#*)"').match(text, i)) and (
            i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")
        ):
            end = '"' + m.group(1)
            j = text.find(end, m.end())
            j = n if j < 0 else j + len(end)
            wipe(i, j)
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            wipe(i, j + 1)
            i = j + 1
        elif c == "'":
            # A char literal ('a', '\n', '\u{1F600}'), or a lifetime ('a) which is left alone.
            m = re.compile(r"'(\\u\{[0-9a-fA-F]+\}|\\.|[^\\'])'").match(text, i)
            if m:
                wipe(i, m.end())
                i = m.end()
            else:
                i += 1
        else:
            i += 1
    return "".join(out)


def skip_item(code, i):
    """End offset of the item starting at `i`: through its `;` or its balanced `{...}` block."""
    depth, n = 0, len(code)
    while i < n:
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0 and c == "}":
                return i + 1
        elif c == ";" and depth == 0:
            return i + 1
        i += 1
    return n


ATTR = re.compile(r"#\s*\[")


def strip_tests(code):
    """Blanks every item under `#[cfg(test)]`; returns (code, names of `#[cfg(test)] mod x;`)."""
    out = list(code)
    test_mods = set()
    for m in re.finditer(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]", code):
        i = m.end()
        # Further attributes on the same item.
        while True:
            while i < len(code) and code[i].isspace():
                i += 1
            if ATTR.match(code, i):
                i = _skip_brackets(code, i)
            else:
                break
        decl = re.compile(r"(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;").match(code, i)
        if decl:
            test_mods.add(decl.group(1))
        end = skip_item(code, i)
        for k in range(m.start(), end):
            if out[k] != "\n":
                out[k] = " "
    return "".join(out), test_mods


def _skip_brackets(code, i):
    """End of an attribute `#[...]` starting at `i`."""
    j = code.index("[", i)
    depth = 0
    while j < len(code):
        if code[j] == "[":
            depth += 1
        elif code[j] == "]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(code)


MOD_DECL = re.compile(r"(?:^|[;{}\]\s])(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+(" + IDENT + r")\s*;")
PATH_ATTR = re.compile(r"#\s*\[\s*path\s*=")


class Module:
    def __init__(self, path, file, code, lines):
        self.path = path  # tuple of segments below the crate root
        self.file = file
        self.code = code
        self.lines = lines
        self.children = {}


def load_crate(root_file):
    """The module tree of one crate, keyed by module path."""
    mods = {}

    def load(path, file, is_dir_owner):
        text = file.read_text()
        code, test_mods = strip_tests(blank(text))
        mod = Module(path, file, code, text.splitlines())
        mods[path] = mod
        base = file.parent if is_dir_owner else file.parent / file.stem
        for m in MOD_DECL.finditer(code):
            name = m.group(1)
            if name in test_mods:
                continue
            candidates = [(base / f"{name}.rs", False), (base / name / "mod.rs", True)]
            for cand, owner in candidates:
                if cand.is_file():
                    mod.children[name] = path + (name,)
                    load(path + (name,), cand, owner)
                    break
            else:
                raise SystemExit(f"{file}: `mod {name};` has no file under {base}")
        return mod

    load((), root_file, True)
    return mods


def use_paths(tree, prefix=()):
    """Every path a `use` tree names: `a::{b, c::{d, e}}` -> a::b, a::c::d, a::c::e."""
    tree = tree.strip()
    out = []
    depth, start, parts = 0, 0, []
    # Split the top level at `::{`.
    m = re.match(r"^((?:" + IDENT + r"\s*::\s*)*)\{(.*)\}$", tree, re.S)
    if m:
        head = tuple(s.strip() for s in m.group(1).split("::") if s.strip())
        inner = m.group(2)
        for i, c in enumerate(inner):
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            elif c == "," and depth == 0:
                parts.append(inner[start:i])
                start = i + 1
        parts.append(inner[start:])
        for p in parts:
            if p.strip():
                out += use_paths(p, prefix + head)
        return out
    tree = re.sub(r"\s+as\s+" + IDENT + r"$", "", tree)
    segs = tuple(s.strip() for s in tree.split("::") if s.strip())
    segs = tuple(s for s in segs if s != "*")
    if segs == ("self",) and prefix:
        segs = ()
    return [prefix + segs]


USE = re.compile(r"(?<![A-Za-z0-9_])use\s+([^;]*);")
INLINE = re.compile(r"(?<![A-Za-z0-9_:])((?:" + IDENT + r")(?:\s*::\s*" + IDENT + r")+)")


def resolve(mods, here, segs):
    """The module an item path names, relative to module `here`; None if outside the crate."""
    if not segs:
        return None
    cur = list(here)
    i = 0
    if segs[0] == "crate":
        cur, i = [], 1
    elif segs[0] == "self":
        i = 1
    elif segs[0] == "super":
        while i < len(segs) and segs[i] == "super":
            if not cur:
                return None
            cur.pop()
            i += 1
    elif segs[0] in mods[here].children:
        pass
    else:
        return None
    target = tuple(cur)
    for s in segs[i:]:
        if s in mods[target].children:
            target = target + (s,)
        else:
            break
    return target


def references(mods, here):
    """(target module, line, text) for every in-crate path module `here` names outside tests."""
    mod = mods[here]
    code = mod.code
    refs = []

    def line_of(off):
        return code.count("\n", 0, off) + 1

    rest = list(code)
    for m in USE.finditer(code):
        for p in use_paths(m.group(1)):
            t = resolve(mods, here, p)
            if t is not None:
                refs.append((t, line_of(m.start()), "::".join(p)))
        for k in range(m.start(), m.end()):
            if rest[k] != "\n":
                rest[k] = " "
    rest = "".join(rest)
    for m in INLINE.finditer(rest):
        p = tuple(s.strip() for s in m.group(1).split("::"))
        t = resolve(mods, here, p)
        if t is not None:
            refs.append((t, line_of(m.start()), "::".join(p)))
    return refs


def sibling_edges(mods):
    """{parent: {(a, b): (file, line, path)}}: child a of parent depends on its sibling b."""
    edges = {}
    for here in mods:
        for target, line, text in references(mods, here):
            k = 0
            while k < min(len(here), len(target)) and here[k] == target[k]:
                k += 1
            if k == len(here) or k == len(target):
                continue  # one contains the other
            parent = here[:k]
            a, b = here[k], target[k]
            edges.setdefault(parent, {}).setdefault((a, b), (mods[here].file, line, text))
    return edges


def cycles(nodes, edges):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    succ = {n: sorted(b for (a, b) in edges if a == n) for n in nodes}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for n in sorted(nodes):
        if n not in index:
            visit(n)
    return out


def a_cycle(comp, edges):
    """One closed walk through a component, for the message: a -> b -> ... -> a."""
    inside = set(comp)
    start = comp[0]
    path, seen = [start], {start}
    # Depth-first search back to `start`.

    def dfs(v):
        for (a, b) in sorted(edges):
            if a != v or b not in inside:
                continue
            if b == start:
                return [start]
            if b not in seen:
                seen.add(b)
                rest = dfs(b)
                if rest is not None:
                    return [b] + rest
        return None

    return path + (dfs(start) or [])


def name(parent, s):
    return "::".join(("crate",) + parent + (s,))


def check(root_file, repo):
    mods = load_crate(root_file)
    failed = False
    for parent, es in sorted(sibling_edges(mods).items()):
        nodes = {a for a, _ in es} | {b for _, b in es}
        for comp in cycles(nodes, es):
            failed = True
            walk = a_cycle(comp, es)
            print(f"{root_file.relative_to(repo)}: module cycle: " + " -> ".join(name(parent, s) for s in walk))
            inside = set(comp)
            for (a, b), (f, line, text) in sorted(es.items()):
                if a in inside and b in inside:
                    print(f"    {name(parent, a)} -> {name(parent, b)}: {f.relative_to(repo)}:{line} names {text}")
    return failed, len(mods)


def crate_roots(repo):
    manifest = tomllib.loads((repo / "Cargo.toml").read_text())
    roots = []
    for member in manifest["workspace"]["members"]:
        for rel in ("src/lib.rs", "src/main.rs"):
            f = repo / member / rel
            if f.is_file():
                roots.append(f)
    return roots


def main(argv):
    repo = Path(__file__).resolve().parent.parent
    roots = [Path(a).resolve() for a in argv[1:]] or crate_roots(repo)
    failed, total = False, 0
    for r in roots:
        f, n = check(r, repo)
        failed |= f
        total += n
    if failed:
        print("break each cycle by moving what both sides need to where it belongs")
        return 1
    print(f"no module cycles ({len(roots)} crates, {total} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
