"""The package's layout (docs/layout.md): engine ← trainer ← scripts, and no import circle anywhere in the package.

Every module's imports of the package are read with ``ast``: absolute ``hdpissa_trl.`` and relative imports, at
module level, inside functions and under ``TYPE_CHECKING`` alike (an import inside a function still ties the two
modules together). ``from package import name`` counts as an import of the submodule when ``name`` is one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hdpissa_trl

PACKAGE_DIR = Path(hdpissa_trl.__file__).parent
ROOT = "hdpissa_trl"


def module_name(path: Path) -> str:
    parts = (ROOT, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _known(name: str) -> str:
    """The package module ``name`` refers to: itself, or the module that defines the attribute it names."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def package_imports(module: str) -> set[str]:
    """The package modules ``module`` imports, wherever in the file the import statement is."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {_known(a.name) for a in node.names if a.name == ROOT or a.name.startswith(ROOT + ".")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != ROOT and not target.startswith(ROOT + "."):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else _known(target))
    found.discard(module)
    return found


GRAPH = {module: package_imports(module) for module in MODULES}


def layer(module: str) -> str:
    """``engine``, ``trainer``, ``scripts``, ``root`` (the package's ``__init__``) or ``top`` (launch, rewards,
    testing_utils, analysis)."""
    if module == ROOT:
        return "root"
    sub = module.split(".")[1]
    return sub if sub in ("engine", "trainer", "scripts") else "top"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_import_reader_sees_every_kind_of_import():
    """Guards the guard: relative and absolute, module level and in-function imports all become edges."""
    assert {"hdpissa_trl.engine.model", "hdpissa_trl.engine.sharded"} <= GRAPH["hdpissa_trl.engine.inject"]
    assert "hdpissa_trl.trainer.sharded_checkpoint" in GRAPH["hdpissa_trl.trainer.checkpoint"]  # in functions only
    assert "hdpissa_trl.engine.distributed" in GRAPH["hdpissa_trl.launch"]  # inside end_worker
    assert "hdpissa_trl.trainer.sft_trainer" in GRAPH[ROOT]  # under TYPE_CHECKING
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_engine_imports_only_the_engine():
    wrong = {m: sorted(t for t in ts if layer(t) != "engine") for m, ts in GRAPH.items() if layer(m) == "engine"}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_the_trainer_imports_nothing_from_the_scripts():
    wrong = {m: sorted(t for t in ts if layer(t) == "scripts") for m, ts in GRAPH.items() if layer(m) == "trainer"}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_the_top_level_helpers_build_on_the_engine_only():
    """launch, rewards, testing_utils and analysis are used by tests, benchmarks and the scripts alike."""
    wrong = {m: sorted(t for t in ts if layer(t) in ("trainer", "scripts", "root"))
             for m, ts in GRAPH.items() if layer(m) == "top"}
    assert not {m: ts for m, ts in wrong.items() if ts}


def test_evaluation_imports_nothing_from_the_package():
    """``evaluation/`` scores any model, baselines included: it must not depend on hdpissa_trl."""
    files, wrong = sorted((PACKAGE_DIR.parent / "evaluation").rglob("*.py")), []
    assert files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            wrong += [f"{path.name}: {n}" for n in names if n == ROOT or n.startswith(ROOT + ".")]
    assert not wrong


@pytest.mark.parametrize("package", ["engine", "trainer", "scripts"])
def test_each_layer_is_a_package(package):
    assert f"{ROOT}.{package}" in MODULES and len([m for m in MODULES if layer(m) == package]) > 1
