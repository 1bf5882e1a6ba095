"""The layout is the architecture: each top-level folder is one layer, and imports run one way.

configs <- model <- data_prep <- inference <- trainer <- command line (demo) <- benchmarks, with
the `u2moe` entry point (the repository root's modules: the package is the root) on top of them
all. Modules import each other relatively, at the top of the file, so that every import names
the folder it reads from; an import inside a function is kept for optional or heavy third-party
packages only. Checked from the source text, so a violation fails here before anything runs.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> installed package (setup.cfg's package_dir), in layer order, bottom first.
LAYERS = {
    "configs": "u2moe.configs",
    "model": "u2moe.model",
    "data_prep": "u2moe.data_prep",
    "inference": "u2moe.inference",
    "trainer": "u2moe.trainer",
    "demo": "u2moe.demo",
    "bench": "u2moe.bench",
}
ENTRY = "u2moe"  # the root's own modules: __init__, __main__ (the command line's entry), help_format
RANK = {package: rank for rank, package in enumerate(LAYERS.values())}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [*LAYERS[rel.parts[0]].split("."), *rel.parts[1:]] if len(rel.parts) > 1 else [ENTRY, rel.name]
    parts[-1] = parts[-1].removesuffix(".py")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer package a module belongs to (the longest matching package name), or ENTRY."""
    return max((p for p in LAYERS.values() if module == p or module.startswith(p + ".")), key=len, default=ENTRY)


def rank_of(module: str) -> float:
    return float("inf") if layer_of(module) == ENTRY else RANK[layer_of(module)]


def sources() -> list[Path]:
    return sorted([*REPO.glob("*.py"), *(p for folder in LAYERS for p in (REPO / folder).rglob("*.py"))])


class Import:
    def __init__(self, path: Path, node: ast.ImportFrom | ast.Import, target: str, in_function: bool):
        self.path, self.line, self.target, self.in_function = path, node.lineno, target, in_function
        self.relative = isinstance(node, ast.ImportFrom) and node.level > 0

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} imports {self.target}"


def project_imports(path: Path, text: str | None = None) -> list[Import]:
    """Every import of a u2moe module in a file (or in `text` as if it were that file), resolved
    to the module it names."""
    tree = ast.parse(path.read_text() if text is None else text, filename=str(path))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "u2moe":
                continue
            # `from . import x` names module x when it is one; the package otherwise.
            names = [f"{target}.{a.name}" for a in node.names]
            targets = [n for n in names if _is_module(n)] or [target]
            found += [Import(path, node, t, id(node) in in_function) for t in targets]
        elif isinstance(node, ast.Import):
            found += [Import(path, node, a.name, id(node) in in_function)
                      for a in node.names if a.name.split(".")[0] == "u2moe"]
    return found


def _is_module(name: str) -> bool:
    return _path_of(name) is not None


def _path_of(module: str) -> Path | None:
    """The file of a u2moe module: the package is the repository root."""
    base = REPO.joinpath(*module.split(".")[1:])
    return next((c for c in (base.with_suffix(".py"), base / "__init__.py") if c.is_file()), None)


ALL = [i for p in sources() for i in project_imports(p)]


def test_every_project_import_resolves_to_a_file():
    assert [str(i) for i in ALL if _path_of(i.target) is None] == []


def test_imports_run_one_way():
    upward = [f"{i} ({layer_of(module_name(i.path))} may not import {layer_of(i.target)})" for i in ALL
              if rank_of(i.target) > rank_of(module_name(i.path))]
    assert upward == []


def test_project_imports_are_relative_and_at_the_top():
    assert [str(i) for i in ALL if not i.relative] == []
    assert [str(i) for i in ALL if i.in_function] == []


def test_no_import_loops():
    graph: dict[str, set[str]] = {}
    for i in ALL:
        source = module_name(i.path)
        target_path = _path_of(i.target)
        graph.setdefault(source, set()).add(module_name(target_path))
    loops, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt == node:
                continue
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                             else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert loops == []


def test_model_imports_nothing_above_it():
    """The network is usable alone: model/ reads only the configs."""
    above = [str(i) for i in ALL if layer_of(module_name(i.path)) == "u2moe.model"
             and layer_of(i.target) not in {"u2moe.configs", "u2moe.model"}]
    assert above == []


@pytest.mark.parametrize("file, text", [
    ("model/encoder.py", "from ..trainer import train"),
    ("inference/decoding/search.py", "from ...bench import rtf"),
    ("data_prep/cmvn.py", "from u2moe.trainer.train import Trainer"),
])
def test_the_check_catches_an_upward_import(file, text):
    """The rule itself: an import against the direction is found and resolved to its target."""
    path = REPO / file
    imports = project_imports(path, text)
    assert imports and all(_path_of(i.target) and rank_of(i.target) > rank_of(module_name(path)) for i in imports)


def test_the_check_sees_every_layer():
    """A vacuous pass is impossible: the tree has imports from and into every layer."""
    assert {layer_of(module_name(i.path)) for i in ALL} == {*LAYERS.values(), ENTRY}
    assert {layer_of(i.target) for i in ALL} >= set(LAYERS.values())
