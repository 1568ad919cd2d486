"""The workspace's ledger: the one opener every stage, command and check uses."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from dpops.config.workspace import Workspace, workspace
from dpops.ledger.anchors import AnchorLog
from dpops.ledger.store import Ledger


def open_ledger(ws: Optional[Workspace] = None, *, must_exist: bool = False) -> Optional[Ledger]:
    """The ledger at ``ws.ledger_url`` (default: this process's workspace), with the workspace's
    anchor log. A SQLite ledger's directory is created on first use; with ``must_exist`` a missing
    SQLite file returns None instead (nothing has been reserved yet)."""
    ws = ws or workspace()
    if ws.ledger_url.startswith("sqlite:///"):
        path = Path(ws.ledger_url[len("sqlite:///"):])
        if not path.exists():
            if must_exist:
                return None
            path.parent.mkdir(parents=True, exist_ok=True)
    return Ledger(ws.ledger_url, anchors=AnchorLog.for_workspace(ws))
