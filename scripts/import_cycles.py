"""Count the modules of ``ckptd`` and ``ckptd_client`` that take part in an import cycle.

Every import statement counts, also one inside a function or under ``TYPE_CHECKING`` (grimp, the
graph import-linter checks, sees them all). Prints each cycle (a strongly connected component of
the module graph) and exits 1 if there is one. ``.venv/bin/python scripts/import_cycles.py``
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("ckptd", "ckptd_client")


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, or one that imports
    itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges[node]:
                        out.append(sorted(component))
    return out


def main() -> int:
    sys.path[:0] = [str(REPO), str(REPO / "client")]
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    edges = {
        m: set(graph.find_modules_directly_imported_by(m)) & graph.modules for m in graph.modules
    }
    cycles = strongly_connected(edges)
    in_cycles = sorted({m for c in cycles for m in c})
    for c in cycles:
        print("cycle:", " <-> ".join(c))
    print(
        f"{len(graph.modules)} modules, {len(cycles)} cycle(s), "
        f"{len(in_cycles)} module(s) in a cycle"
    )
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
