"""Build small real DVC repositories for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}


def sh(cwd: Path, *args: str) -> str:
    out = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed: {out.stderr}")
    return out.stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def tsv(rows: list[tuple[str, str]], header: tuple[str, str] = ("label", "text")) -> str:
    return "\n".join(["\t".join(header), *("\t".join(r) for r in rows)]) + "\n"


def make_repo(root: Path, files: dict[str, str | bytes]) -> Path:
    """A git + DVC repository whose ``files`` are DVC-tracked and committed."""
    root.mkdir(parents=True, exist_ok=True)
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    commit(root, files, "data v1")
    return root


def commit(root: Path, files: dict[str, str | bytes], message: str) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    dvc(root, "add", "-q", *files)
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", message)
