"""Imports point down only: no package imports from a layer above it (or beside it), and no
two modules import each other, however indirectly (no circle inside a package either).

The order is the design's (DESIGN.md §13): the node process (``service``) composes everything;
``ui`` sits on the gateway and control; those two use ``node`` (block server, links); ``node``
uses the bottom layer. Every import counts, also those inside functions and those made only
for type checkers: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tiktrue

LAYERS = [
    {"paths", "database", "limits", "__init__"},  # the package's own base modules
    {"protocol", "security", "model", "monitoring"},
    {"node"},
    {"control", "gateway"},
    {"ui"},
    {"service"},
    {"demo"},
    {"cli"},
    {"__main__"},
]
ROOT = Path(tiktrue.__file__).parent


def _layer(part: str) -> int:
    for index, members in enumerate(LAYERS):
        if part in members:
            return index
    raise AssertionError(f"tiktrue.{part} is in no layer: add it to LAYERS")


def _part(module: str) -> str:
    """``tiktrue.node.peer_link`` -> ``node``; ``tiktrue`` -> ``__init__``."""
    pieces = module.split(".")
    return pieces[1].removesuffix(".py") if len(pieces) > 1 else "__init__"


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tiktrue")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "tiktrue":
                found += [
                    (node.lineno, f"tiktrue.{a.name}" if _is_module(a.name) else "tiktrue")
                    for a in node.names
                ]
            elif node.module.startswith("tiktrue."):
                found.append((node.lineno, node.module))
    return found


def test_every_import_points_down():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        here = relative.parts[0].removesuffix(".py")
        for line, module in _imports(path):
            there = _part(module)
            if there == here or there in LAYERS[0]:
                continue
            if _layer(there) >= _layer(here):
                wrong.append(f"{relative}:{line} imports {module}")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    """The walker finds imports inside functions too (a test that can fail)."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from tiktrue.service.service_runner import NodeService\n")
    assert _imports(sample) == [(2, "tiktrue.service.service_runner")]
    assert _layer(_part("tiktrue.service.service_runner")) > _layer("node")


# --- no circles -----------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    """``<root>/control/join.py`` -> ``tiktrue.control.join``; a package's ``__init__.py`` ->
    the package."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that the file imports: ``from tiktrue.control import join``
    counts as ``tiktrue.control.join`` when that is a module, else as the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in modules:
                    found.add(full)
                elif node.module in modules:
                    found.add(node.module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (itself left out)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    return {name: _module_imports(path, modules) - {name} for name, path in files.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm,
    iterative): each is a set of modules that import each other, directly or not."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    found.append(sorted(component))
    return found


def _one_cycle(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One path around a circle, to name it: from the first module back to itself."""
    members = set(component)
    path, seen = [component[0]], {component[0]}
    while True:
        nexts = sorted(graph[path[-1]] & members)
        back = component[0] in nexts and len(path) > 1
        if back:
            return [*path, component[0]]
        step = next((m for m in nexts if m not in seen), None)
        if step is None:  # only edges back into the path: close the loop there
            target = next(m for m in nexts if m in seen)
            return [*path[path.index(target) :], target]
        path.append(step)
        seen.add(step)


def test_no_module_imports_itself_in_a_circle():
    graph = import_graph()
    found = circles(graph)
    assert not found, "imports in a circle:\n" + "\n".join(
        " -> ".join(_one_cycle(component, graph)) for component in found
    )


def test_the_check_sees_a_hidden_circle(tmp_path):
    """A circle inside a package, one edge of it in a function (as the control plane had),
    another only for type checkers: found; the same modules without the back edge: none."""
    package = tmp_path / "tiktrue" / "pkg"
    package.mkdir(parents=True)
    (tmp_path / "tiktrue" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from tiktrue.pkg import b\n")
    (package / "b.py").write_text("from tiktrue.pkg.c import thing\n")
    (package / "c.py").write_text("def f():\n    from tiktrue.pkg.a import x\n")
    (package / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import tiktrue.pkg.e\n"
    )
    (package / "e.py").write_text("from tiktrue.pkg import d\n")
    graph = import_graph(tmp_path / "tiktrue")
    assert circles(graph) == [
        ["tiktrue.pkg.a", "tiktrue.pkg.b", "tiktrue.pkg.c"],
        ["tiktrue.pkg.d", "tiktrue.pkg.e"],
    ]
    assert _one_cycle(circles(graph)[0], graph) == [
        "tiktrue.pkg.a",
        "tiktrue.pkg.b",
        "tiktrue.pkg.c",
        "tiktrue.pkg.a",
    ]
    (package / "c.py").write_text("def f():\n    pass\n")
    (package / "e.py").write_text("")
    assert circles(import_graph(tmp_path / "tiktrue")) == []
