"""The package's import graph, read from the source with ``ast``: no cycles, and
the layers of DESIGN.md §1 keep their direction (the IM layer knows nothing of
the web front end, the cluster nothing of the SQLite backend: the composition
root, ``bitchat.app``, is what puts them together).

An edge is an ``import a.b`` or a ``from a.b import c`` (to ``a.b.c`` when that
is a module, else to ``a.b``). For cycles only imports that run when the module
loads count: module level, outside ``if TYPE_CHECKING:``; a function-local
import runs later, when every module is loaded. For the layers every import
counts, function-local ones too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in sorted((SRC / "bitchat").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        found[".".join(parts)] = (path, package)
    return found


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(module: str, package: bool, node: ast.Import | ast.ImportFrom) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = module.split(".") if package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        source = ".".join([*base, node.module] if node.module else base)
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.add(sub if sub in MODULES else source)
    return out


def _imports(module: str, *, at_load: bool) -> set[str]:
    path, package = MODULES[module]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.update(_targets(module, package, node))
            elif at_load and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue  # runs when called, not when the module loads
            elif at_load and isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse)
            else:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        visit([child])
                    elif isinstance(child, ast.excepthandler | ast.match_case):
                        visit(child.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return {m for m in found if m in MODULES and m != module}


def _graph(*, at_load: bool) -> dict[str, set[str]]:
    return {m: _imports(m, at_load=at_load) for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def walk(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append([*path[path.index(n) :], n])
            elif n not in state:
                walk(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    return cycles


def _reach(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not: module -> who imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        m = todo.pop()
        for n in graph[m]:
            if n not in seen:
                seen[n] = m
                todo.append(n)
    return seen


def _chain(reach: dict[str, str], start: str, end: str) -> str:
    links = [end]
    while links[-1] != start:
        links.append(reach[links[-1]])
    return " -> ".join(reversed(links))


def test_the_graph_is_read_right() -> None:
    load = _graph(at_load=True)
    assert "bitchat.connection" in load["bitchat.server"]
    assert "bitchat.server" not in load["bitchat.connection"]  # only under TYPE_CHECKING
    assert "bitchat.web.status" in load["bitchat.web.http"]  # from bitchat.web import status
    assert "bitchat.web" in load["bitchat.app"]
    assert "bitchat.cluster.node" not in load["bitchat.app"]  # a function-local import
    assert "bitchat.cluster.node" in _graph(at_load=False)["bitchat.app"]


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph(at_load=True))
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


LAYERS = [
    ("bitchat.im", "bitchat.web"),  # the root installs the web front end
    ("bitchat.im", "bitchat.cluster"),
    ("bitchat.cluster", "bitchat.im.sqlite"),
    # Below the composition root, nothing imports it.
    ("bitchat.im", "bitchat.app"),
    ("bitchat.cluster", "bitchat.app"),
    ("bitchat.web", "bitchat.app"),
]


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize(("layer", "forbidden"), LAYERS)
def test_a_layer_does_not_import(layer: str, forbidden: str) -> None:
    graph = _graph(at_load=False)
    modules = [m for m in MODULES if _under(m, layer)]
    assert modules
    for module in modules:
        reach = _reach(graph, module)
        for bad in (m for m in reach if _under(m, forbidden)):
            pytest.fail(f"{layer} must not import {forbidden}: {_chain(reach, module, bad)}")
