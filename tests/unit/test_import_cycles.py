"""No import cycles in controller/, drivers/ or sim/, function-level imports included.

import-linter's layers contracts (pyproject.toml, ``make lint``) keep the direction
between layers; they do not see a circle inside one layer, and a function-level import
hides a circle from the interpreter until the day the import order changes. grimp reads
every import statement, wherever it sits (also under ``if TYPE_CHECKING``), so the test
sees exactly those. Pure: it parses the source, it imports nothing of ours.
"""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("controller", "drivers", "sim")


def _cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    imported = graph.find_modules_directly_imported_by(child) & modules
                    work.append((child, iter(sorted(imported))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(graph: grimp.ImportGraph, package: str) -> None:
    # A package's __init__ re-exporting its own modules (controller.cli's main) is not a
    # circle between modules, so packages themselves are left out.
    packages = {m for m in graph.modules if graph.find_children(m)}
    modules = {m for m in graph.modules if m.startswith(package + ".") and m not in packages}
    assert _cycles(graph, modules) == []


def test_the_check_finds_a_circle() -> None:
    """The Tarjan walk itself: a planted circle is found (a check that cannot fail is none)."""
    g = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    assert _cycles(g, {"p.a", "p.b", "p.c"}) == [["p.a", "p.b", "p.c"]]
