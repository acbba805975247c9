"""The package's layering: a module imports only from its own layer or below, and no cycles.

Layers, bottom to top (see the design notes): errors, files < config < data, models, thinning < teachers
< methods < engine (and report) < runner, deploy, demo < commands < cli. Imports are read with
`ast` (module-level and function-level, absolute and relative), so nothing is imported to check.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "distillkit"

# layer of each first component below `distillkit`; a module not named here fails the test, so a
# new top-level module has to be placed deliberately
LAYERS: dict[str, int] = {
    "": 0,  # the package __init__ (version only)
    "errors": 0,
    # atomic file writes, standard library only
    "files": 0,
    "config": 1,
    "data": 2,
    "models": 2,
    "thinning": 2,
    "teachers": 3,
    "methods": 4,
    "engine": 5,
    # report only plots metrics files: engine level keeps it usable by anything above
    "report": 5,
    "runner": 6,
    "deploy": 6,
    "demo": 6,
    # the Python API (distill/train with objects) runs through the runner
    "api": 6,
    "commands": 7,
    "cli": 8,
    "__main__": 8,
}

# Violations present when the layering was written down, to be removed as the code is moved
# (engine/method contract, runner-side validation). Each entry is "importer -> imported"; a new
# violation fails test_no_upward_imports, and an entry that no longer occurs fails
# test_known_violations_still_occur, so this list only ever shrinks.
KNOWN: set[str] = set()  # empty: every layer imports only from below


@dataclass(frozen=True)
class Import:
    """One `import` statement's target inside the package."""

    importer: str
    target: str
    line: int
    module_level: bool  # executed on import (not inside a function, not under TYPE_CHECKING)


def module_name(path: Path) -> str:
    """Dotted module name of a file under SRC (a package's __init__ is the package)."""
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against the importer)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """The package-internal imports of one module, each resolved to a module that exists."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def target_of(dotted: str) -> str | None:
        # the longest existing module prefix: `distillkit.models.build_model` -> distillkit.models
        parts = dotted.split(".")
        while parts:
            cand = ".".join(parts)
            if cand in modules:
                return cand
            parts.pop()
        return None

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
                continue
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve_from(child, name, is_package)
                # `from pkg import sub` imports the submodule when there is one
                targets = [f"{base}.{a.name}" if a.name != "*" else base for a in child.names]
            for dotted in targets:
                if dotted.split(".")[0] != PACKAGE:
                    continue
                target = target_of(dotted)
                if target is not None and target != name:
                    found.append(Import(name, target, child.lineno, module_level))
            visit(child, module_level)

    visit(tree, True)
    return found


def layer_of(module: str) -> int:
    """The layer of a package module (KeyError for a top-level module not in LAYERS)."""
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def all_imports() -> list[Import]:
    """Every package-internal import of every module."""
    modules = all_modules()
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def violations() -> dict[str, Import]:
    """Imports from a higher layer, by "importer -> imported" (the first occurrence)."""
    out: dict[str, Import] = {}
    for imp in all_imports():
        if layer_of(imp.target) > layer_of(imp.importer):
            out.setdefault(f"{imp.importer} -> {imp.target}", imp)
    return out


def module_level_cycles() -> list[list[str]]:
    """Import cycles among modules through imports executed at import time."""
    modules = all_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in all_imports():
        if not imp.module_level:
            continue
        graph[imp.importer].add(imp.target)
        # importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer is inside
        # them (then they are already running and Python hands back the partial package)
        parts = imp.target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if not (imp.importer == parent or imp.importer.startswith(parent + ".")):
                graph[imp.importer].add(parent)
    # Tarjan's strongly connected components; a component of two or more modules is a cycle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return cycles


# --------------------------------------------------------------------------- the checker itself


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return {module_name(p): p for p in sorted((root / PACKAGE).rglob("*.py"))}


def test_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    modules = _write(
        tmp_path,
        {
            "distillkit/__init__.py": "",
            "distillkit/config.py": "",
            "distillkit/methods/__init__.py": "from . import kd\n",
            "distillkit/methods/kd.py": (
                "from ..engine import checkpoint\n"
                "def f():\n    from distillkit.runner import run\n"
                "if TYPE_CHECKING:\n    import distillkit.cli\n"
            ),
            "distillkit/engine/__init__.py": "",
            "distillkit/engine/checkpoint.py": "",
            "distillkit/runner.py": "",
            "distillkit/cli.py": "",
        },
    )
    imps = {
        (i.importer, i.target, i.module_level)
        for name, path in modules.items()
        for i in imports_of(name, path, modules)
    }
    assert imps == {
        ("distillkit.methods", "distillkit.methods.kd", True),
        ("distillkit.methods.kd", "distillkit.engine.checkpoint", True),
        ("distillkit.methods.kd", "distillkit.runner", False),
        ("distillkit.methods.kd", "distillkit.cli", False),
    }


def test_checker_finds_a_cycle_through_a_package_init(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    _write(
        tmp_path,
        {
            "distillkit/__init__.py": "",
            "distillkit/models/__init__.py": "from distillkit.models import cnn\n",
            "distillkit/models/cnn.py": "from distillkit.data.datasets import X\n",
            "distillkit/data/__init__.py": "from distillkit.data.datasets import X\n",
            "distillkit/data/datasets.py": "from distillkit.models.cnn import Y\n",
        },
    )
    (cycle,) = module_level_cycles()
    # the two packages are in it too: importing models.cnn first runs models/__init__
    assert cycle == [
        "distillkit.data",
        "distillkit.data.datasets",
        "distillkit.models",
        "distillkit.models.cnn",
    ]


# --------------------------------------------------------------------------- the package


def test_every_module_has_a_layer():
    unplaced = []
    for name in all_modules():
        try:
            layer_of(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"modules with no layer (add them to LAYERS): {unplaced}"


def test_no_upward_imports():
    new = {k: v for k, v in violations().items() if k not in KNOWN}
    listing = "\n".join(
        f"  {k}  (line {v.line}, layer {layer_of(v.importer)} -> {layer_of(v.target)})"
        for k, v in sorted(new.items())
    )
    assert not new, f"imports from a higher layer:\n{listing}"


def test_known_violations_still_occur():
    gone = sorted(KNOWN - set(violations()))
    assert not gone, f"no longer violations, remove them from KNOWN: {gone}"


def test_no_module_level_import_cycles():
    cycles = module_level_cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("banned", ["torch", "torchvision"])
def test_thinning_imports_no_torch(banned):
    bad = []
    for name, path in all_modules().items():
        if not name.startswith(f"{PACKAGE}.thinning"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{name}:{node.lineno} {n}" for n in names if n.split(".")[0] == banned]
    assert not bad, f"thinning must stay numpy-only: {bad}"
