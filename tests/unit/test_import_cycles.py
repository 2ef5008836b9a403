"""No import cycles among ember's modules: every `import` / `from ... import` in ember/ (function-local ones
too, which hide a cycle from a plain `python -c "import ..."`; `if TYPE_CHECKING:` blocks excepted, they
never run) gives an edge, and the graph must have no cycle. Also: no route module imports another."""
from __future__ import annotations

import ast
from pathlib import Path

import ember

ROOT = Path(ember.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ember modules `name` imports (a `from pkg import mod` names the submodule when it is one)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def resolve(target: str) -> None:
        if target in modules:
            out.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for c in child.orelse:
                    visit(c)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "ember":
                        resolve(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "ember":
                    continue
                resolve(target)
                for a in child.names:
                    resolve(f"{target}.{a.name}")
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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

    import sys
    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_the_walk_sees_function_local_imports():
    """The check itself: a cycle made of a top-level and a function-local import is found."""
    graph = _graph()
    assert "ember.launch_server" in graph["ember.cli"]  # top level
    assert "ember.api.app" in graph["ember.launch_server"]  # inside run_server()
    fake = {**graph, "ember.server_args": graph["ember.server_args"] | {"ember.cli"}}
    assert any({"ember.cli", "ember.launch_server", "ember.server_args"} <= set(c) for c in _cycles(fake))


def test_no_route_module_imports_another():
    graph = _graph()
    routes = {m for m in graph if m.startswith("ember.api.") and m.endswith("_routes")}
    assert len(routes) >= 4, routes
    for m in routes:
        assert not (graph[m] & routes), (m, graph[m] & routes)


def test_launch_server_exports_sglang_helpers():
    """Seed 001 imports the helpers from ember.launch_server (as from sglang.utils)."""
    from ember import launch_server, utils
    assert launch_server.launch_server_cmd is utils.launch_server_cmd
    assert launch_server.wait_for_server is utils.wait_for_server
    assert {"launch_server_cmd", "wait_for_server", "terminate_process"} <= set(launch_server.__all__)
