"""Imports point down only: no package imports from a layer above it (or beside it).

The order is the design's (DESIGN.md §13): the node process (``service``) composes everything;
``ui`` sits on the gateway and control; those two use ``node`` (block server, links); ``node``
uses the bottom layer. Every import counts, also those inside functions.
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
