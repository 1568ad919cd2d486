"""The project's documents point only inside the project, and docs/architecture.md names what exists.

``docs/architecture.md`` is a newcomer's map of the code; a map that names a module, a test or a
stage the code does not have sends the reader astray, so the names it gives are checked here
against the tree and against the flow.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"

#: Documents that live outside the project (a development workspace), spelled in pieces so that
#: this file does not name them itself. Matched case-sensitively: ``audit.md`` is a file the audit writes.
OUTSIDE = ("DESIGN" + ".md", "STYLE" + ".md", "AUDIT" + ".md", ".." + "/shared")

#: Tracked paths that hold data, not text of the project (the DVC remote's content-addressed cache).
DATA_PREFIXES = ("dvc-remote/",)
#: Directories never walked when the tree is not a git checkout.
UNTRACKED_DIRS = {".git", ".venv", ".dpops", "data", "dvc-remote", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _project_files() -> list[Path]:
    """The tracked files (``git ls-files``); outside a git checkout, the tree less what is never tracked."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        names = [n for n in out.decode("utf-8").split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not UNTRACKED_DIRS.intersection(p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if not n.startswith(DATA_PREFIXES) and (ROOT / n).is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
    raw = path.read_bytes()
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_references(files: list[Path], root: Path = ROOT) -> list[str]:
    """``path:line: name`` (relative to ``root``) for every mention of a document outside the project."""
    found = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(root)}:{i}: {name}" for name in OUTSIDE if name in line]
    return found


def test_no_file_points_to_a_document_outside_the_project():
    files = _project_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files), "no project files found"
    found = outside_references(files)
    assert not found, f"files that point to documents outside the project: {found}"


def test_the_outside_reference_check_finds_one(tmp_path):
    """The check above can fail: a docstring naming a workspace document is found, with its line."""
    bad = tmp_path / "mod.py"
    bad.write_text('"""The ledger.\n\nSemantics (see ' + OUTSIDE[0] + ', "The ledger")."""\n')
    clean = tmp_path / "ok.py"
    clean.write_text('"""Writes audit.md beside audit.json."""\n')
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\0" + OUTSIDE[0].encode())
    assert outside_references([bad, clean, binary], root=tmp_path) == [f"mod.py:3: {OUTSIDE[0]}"]


# --------------------------------------------------------------------------- docs/architecture.md

#: ``src/dpops/...`` paths: a module (``.py``) or a folder (ending in ``/``).
SRC_PATH = re.compile(r"(?<![\w/.])src/dpops/(?:[A-Za-z0-9_]+/)*(?:[A-Za-z0-9_]+\.py)?")
#: Dotted names with at least two parts below ``dpops`` (``dpops.ledger.store``); a single part
#: (``dpops.charge_id``) is an MLflow tag or a logger's name as often as a module.
DOTTED = re.compile(r"(?<![\w./-])dpops(?:\.[A-Za-z_][A-Za-z0-9_]*){2,}")
#: Paths outside the library: tests, flows, tasks.
OTHER_PATH = re.compile(r"(?<![\w/.])(?:tests|flows|tasks)/(?:[A-Za-z0-9_]+/)*(?:[A-Za-z0-9_]+\.py)?")


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT / "src" / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(module: Path, name: str) -> bool:
    """Whether ``module`` defines ``name`` at its top level (a function, class or assignment)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def missing_names(doc: str) -> list[str]:
    """Every ``src/dpops/...`` path and ``dpops.x.y`` name in ``doc`` that the tree does not have.

    A dotted name is a module (``dpops.ledger.store``) or a top-level name of one
    (``dpops.privacy.accounting.epsilon``)."""
    missing = []
    for path in sorted(set(SRC_PATH.findall(doc))):
        target = ROOT / path
        if not (target.is_file() if path.endswith(".py") else target.is_dir()):
            missing.append(path)
    for name in sorted(set(DOTTED.findall(doc))):
        parts = name.split(".")
        if _module_file(parts) is not None:
            continue
        parent = _module_file(parts[:-1])
        if parent is None or not _defines(parent, parts[-1]):
            missing.append(name)
    return missing


def test_the_name_checks_find_what_is_missing():
    """The check below can fail: made-up paths and names are reported, real ones are not."""
    doc = ("`src/dpops/errors.py`, `src/dpops/`, `src/dpops/nowhere.py`, `src/dpops/nowhere/`, "
           "`dpops.errors.exit_code`, `dpops.errors.no_such_name`, `dpops.nowhere.at_all`, tag `dpops.charge_id`")
    assert missing_names(doc) == ["src/dpops/nowhere.py", "src/dpops/nowhere/", "dpops.errors.no_such_name", "dpops.nowhere.at_all"]


def test_every_library_path_the_architecture_names_exists():
    doc = DOC.read_text(encoding="utf-8")
    assert len(SRC_PATH.findall(doc)) > 20, "docs/architecture.md names no library paths: was it parsed?"
    missing = missing_names(doc)
    assert not missing, f"docs/architecture.md names what the tree does not have: {missing}"


def test_every_test_flow_and_task_path_the_architecture_names_exists():
    doc = DOC.read_text(encoding="utf-8")
    paths = sorted(set(OTHER_PATH.findall(doc)))
    assert "flows/private_finetune.py" in paths and any(p.startswith("tests/test_") for p in paths)
    missing = [p for p in paths if not (ROOT / p).is_file() and not (p.endswith("/") and (ROOT / p).is_dir())]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


def _doc_stages(doc: str) -> list[tuple[int, str]]:
    """(number, name) of the rows of the stage table: ``| 3 | plan | `plan` | ...``."""
    return [(int(n), name) for n, name in re.findall(r"^\| (\d+) \| ([a-z_]+) \| `", doc, flags=re.MULTILINE)]


def _flow_stages() -> list[str]:
    """The task calls of ``private_finetune`` in source order (``_train``: the train stage), less the artifacts."""
    tree = ast.parse((ROOT / "flows" / "private_finetune.py").read_text(encoding="utf-8"))
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "private_finetune")
    task_modules = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "tasks" for a in n.names}
    calls = sorted((n for n in ast.walk(flow) if isinstance(n, ast.Call)), key=lambda n: (n.lineno, n.col_offset))
    out = []
    for call in calls:
        f = call.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in task_modules:
            if not f.attr.endswith("_artifact"):
                out.append(f.attr)
        elif isinstance(f, ast.Name) and f.id == "_train":
            out.append("train")
    return out


def test_the_stage_table_is_the_flow_in_its_order():
    stages = _doc_stages(DOC.read_text(encoding="utf-8"))
    assert [n for n, _ in stages] == list(range(len(stages))), f"stage numbers out of order: {stages}"
    assert stages[0][1] == "preflight"  # run before the flow (dpops run) and again by plan
    flow = _flow_stages()
    assert len(flow) >= 10, f"the flow's task calls were not found: {flow}"
    assert [name for _, name in stages[1:]] == flow
