"""The import contract: the layers of docs/architecture.md, checked on the source and at run time.

Every ``import`` in ``src/dpops`` is read from the syntax tree, at module level and inside
functions alike (only ``if TYPE_CHECKING:`` blocks are skipped: they never run), so a lazy import
cannot hide a layer crossing or a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dpops"

#: Which dpops layers each layer may import (besides itself). ``pipeline`` and ``cli`` alone cross
#: them; ``errors`` and the top-level ``dpops`` (its version) are open to all.
BASE = {"errors", "dpops"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "privacy": BASE,
    "config": BASE | {"privacy"},
    "ledger": BASE | {"privacy", "config"},
    "data": BASE | {"config"},
    "models": BASE | {"config"},
    "assess": BASE | {"privacy", "config", "data", "models"},
    "train": BASE | {"privacy", "config", "data", "models", "assess", "ledger"},
    "registry": BASE | {"privacy", "config", "ledger", "assess", "models"},
    "pipeline": BASE | {"privacy", "config", "ledger", "data", "models", "assess", "train", "registry"},
    "cli": BASE | {"privacy", "config", "ledger", "data", "models", "assess", "train", "registry", "pipeline"},
}
#: The one module of another layer ``train`` may read: a charge's record, pure Python.
TRAIN_READS_OF_LEDGER = {"dpops.ledger.states"}
#: Third-party packages a layer never imports.
FORBIDDEN: dict[str, set[str]] = {
    "train": {"sqlalchemy", "alembic", "psycopg", "mlflow", "prefect"},
    "ledger": {"torch", "transformers", "peft", "opacus"},
    "privacy": {"torch", "transformers", "peft", "opacus", "sqlalchemy", "mlflow"},
    "config": {"torch", "sqlalchemy", "mlflow"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dpops"


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import that runs, resolving ``from pkg import module``."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in known else child.module, child.lineno))
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def test_every_module_belongs_to_a_known_layer(graph):
    unknown = sorted(m for m in graph if _layer(m) not in ALLOWED and m != "dpops")
    assert not unknown, f"modules outside the layers of docs/architecture.md: {unknown}"


def test_layers_import_only_the_layers_below_them(graph):
    crossings = []
    for module, imports in graph.items():
        layer = _layer(module)
        if module == "dpops":
            continue
        for target, line in imports:
            if not target.startswith("dpops") or target == "dpops" and layer in ALLOWED:
                continue
            other = _layer(target)
            if other == layer:
                continue
            if other not in ALLOWED[layer]:
                crossings.append(f"{module}:{line} imports {target} ({layer} -> {other})")
            elif layer == "train" and other == "ledger" and target not in TRAIN_READS_OF_LEDGER:
                crossings.append(f"{module}:{line} imports {target} (train reads only {sorted(TRAIN_READS_OF_LEDGER)})")
    assert not crossings, "layer crossings:\n" + "\n".join(crossings)


def test_no_layer_imports_a_forbidden_library(graph):
    found = []
    for module, imports in graph.items():
        banned = FORBIDDEN.get(_layer(module), set()) | {"prefect"}  # the library never imports Prefect
        found += [f"{module}:{line} imports {target}" for target, line in imports if target.split(".")[0] in banned]
    assert not found, "\n".join(found)


def test_the_module_graph_has_no_cycle(graph):
    """No import, at module level or inside a function, closes a cycle (a function-level import
    that only breaks a cycle is a cycle). Package ``__init__`` files only gather their own modules."""
    edges = {m: sorted({t for t, _ in imports if t in graph and t != m}) for m, imports in graph.items()}
    for module, targets in edges.items():
        if PACKAGE.joinpath(*module.split(".")[1:], "__init__.py").exists():  # a package: its own modules only
            strays = [t for t in targets if not t.startswith(module + ".") and _layer(t) not in BASE]
            assert not strays, f"{module}/__init__.py imports other layers: {strays}"
    edges = {m: [t for t in ts if not PACKAGE.joinpath(*t.split(".")[1:], "__init__.py").exists()] for m, ts in edges.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(out.stdout.split())


@pytest.mark.parametrize(("statement", "absent"), [
    ("import dpops.train", {"sqlalchemy", "mlflow", "prefect"}),
    ("import dpops.ledger.store, dpops.privacy", {"torch", "prefect"}),
    ("import dpops.config", {"torch", "sqlalchemy", "mlflow", "prefect"}),
    ("import dpops.cli", {"torch", "prefect", "mlflow"}),
    ("import dpops.pipeline.report", {"torch", "mlflow", "prefect"}),  # the scheduled budget report
])
def test_importing_a_layer_loads_only_what_it_needs(statement, absent):
    loaded = _loaded_after(statement)
    assert not loaded & absent, f"{statement!r} loaded {sorted(loaded & absent)}"


def test_each_package_states_its_public_names():
    import importlib

    for init in sorted(PACKAGE.glob("*/__init__.py")):
        name = _module_name(init)
        if name.endswith("migrations"):
            continue
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "__all__", None), list) and module.__all__, f"{name} has no __all__"
        missing = [n for n in module.__all__ if not hasattr(module, n) and importlib.util.find_spec(f"{name}.{n}") is None]
        assert not missing, f"{name}.__all__ names what it does not have: {missing}"


def test_every_import_of_a_dpops_name_resolves(graph):
    """Function-level imports run only when their function does: check every one names something real
    (a module moved, a name left behind, is found here and not in a user's run)."""
    import importlib

    missing = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpops") and node.level == 0):
                continue
            target = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(target, alias.name) and f"{node.module}.{alias.name}" not in graph:
                    missing.append(f"{module}:{node.lineno} from {node.module} import {alias.name}")
    assert not missing, "imports that would fail when they run:\n" + "\n".join(missing)


def test_every_attribute_of_an_imported_dpops_module_exists():
    """``cfgmod.load_job_config``, ``stages.record``: a name used through a module alias must still be
    there after a move (lint cannot see it; the call would fail only when it runs)."""
    import importlib

    root = SRC.parent
    missing = []
    for path in [*PACKAGE.rglob("*.py"), *(root / "flows").glob("*.py"), *(root / "tasks").glob("*.py")]:
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpops") and node.level == 0:
                for alias in node.names:
                    if importlib.util.find_spec(node.module) and f"{node.module}.{alias.name}" in _modules():
                        aliases[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                module = aliases[node.value.id]
                if not hasattr(module, node.attr) and f"{module.__name__}.{node.attr}" not in _modules():
                    missing.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr} ({module.__name__})")
    assert not missing, "attributes that do not exist:\n" + "\n".join(missing)
