#!/usr/bin/env python3
"""Fails when the top-level modules of a crate import each other in a cycle.

    scripts/check-module-dag.py smartcloudops-core/src

A top-level module is a file `src/NAME.rs` or a folder `src/NAME/`. Module A depends on B when
code or a doc comment in A names `crate::B` — as a path, or inside `use crate::{B, ...}`.
Paths through the crate root (`crate::Error`) are reported too: they hide the edge. The
check reports every strongly connected component of more than one module, with one
file:line per edge of the cycle, and prints the layers (a topological order) when there is
none. `lib.rs` is the root and may name anything.
"""

import re
import sys
from pathlib import Path

PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")
# `crate::Error` and the like: a root re-export, which hides which module is imported.
ROOT_ITEM = re.compile(r"\bcrate::([A-Z][A-Za-z0-9_]*)")
GROUP = re.compile(r"\bcrate::\{")
IDENT_AT_DEPTH0 = re.compile(r"[a-z_][a-z0-9_]*")


def strip_comment(line: str) -> str:
    """The code part of a line: drops `//` comments (and doc comments) outside strings."""
    out, in_str, i = [], False, 0
    while i < len(line):
        c = line[i]
        if in_str:
            if c == "\\":
                out.append(line[i : i + 2])
                i += 2
                continue
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif line.startswith("//", i):
            break
        out.append(c)
        i += 1
    return "".join(out)


def group_heads(text: str, start: int) -> list[str]:
    """The first path segment of every item of a `crate::{...}` group starting at `start`."""
    depth, i, heads, expect = 0, start, [], True
    while i < len(text):
        c = text[i]
        if c == "{":
            depth += 1
            expect = depth == 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        elif c == "," and depth == 1:
            expect = True
        elif expect and depth == 1 and not c.isspace():
            m = IDENT_AT_DEPTH0.match(text, i)
            if m:
                heads.append(m.group(0))
                i = m.end()
                expect = False
                continue
            expect = False
        i += 1
    return heads


def module_files(src: Path) -> dict[str, list[Path]]:
    modules: dict[str, list[Path]] = {}
    for entry in sorted(src.iterdir()):
        if entry.is_file() and entry.suffix == ".rs" and entry.stem not in ("lib", "main"):
            modules.setdefault(entry.stem, []).append(entry)
        elif entry.is_dir():
            modules.setdefault(entry.name, []).extend(sorted(entry.rglob("*.rs")))
    return modules


def edges(src: Path, hidden: list[str]) -> dict[str, dict[str, str]]:
    """module -> {dependency: "file:line" of its first use}; root re-exports go to `hidden`."""
    modules = module_files(src)
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, files in modules.items():
        for path in files:
            lines = path.read_text().splitlines()
            # Doc comments count: an intra-doc link to a higher module is an upward edge too.
            code = "\n".join(l if l.lstrip().startswith(("///", "//!")) else strip_comment(l) for l in lines)
            line_starts = [0]
            for l in code.split("\n"):
                line_starts.append(line_starts[-1] + len(l) + 1)

            def where(offset: int) -> str:
                lo = max(i for i, s in enumerate(line_starts) if s <= offset)
                return f"{path}:{lo + 1}"

            hidden += [f"{where(m.start())}: crate::{m.group(1)}" for m in ROOT_ITEM.finditer(code)]
            found = [(m.start(), m.group(1)) for m in PATH.finditer(code)]
            for m in GROUP.finditer(code):
                found += [(m.start(), h) for h in group_heads(code, m.end() - 1)]
            for offset, dep in found:
                if dep != module and dep in modules:
                    graph[module].setdefault(dep, where(offset))
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layers(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    depth: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in depth:
            depth[v] = 1 + max((d(w) for w in graph[v]), default=-1)
        return depth[v]

    out: dict[int, list[str]] = {}
    for v in graph:
        out.setdefault(d(v), []).append(v)
    return [sorted(out[k]) for k in sorted(out)]


def main() -> int:
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "smartcloudops-core/src")
    hidden: list[str] = []
    graph = edges(src, hidden)
    found = cycles(graph)
    if hidden:
        print(f"{src}: paths through the crate root hide which module is imported; name it:")
        for h in hidden:
            print(f"  {h}")
    if found:
        print(f"{src}: import cycles between top-level modules:")
        for component in found:
            print(f"  cycle: {' <-> '.join(component)}")
            for a in component:
                for b in component:
                    if b in graph[a]:
                        print(f"    {a} -> {b}  ({graph[a][b]})")
    if found or hidden:
        return 1
    print(f"{src}: the top-level modules form a DAG; layers, lowest first:")
    for i, layer in enumerate(layers(graph)):
        print(f"  {i}: {', '.join(layer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
