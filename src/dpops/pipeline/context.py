"""One run context per process: the workspace, its ledger, and the trained model as last loaded.

Every stage of a flow that runs in one process (``dpops run``, a Prefect worker running the flow)
asks :func:`current` for the context of this process's workspace: the ledger is opened once (one
schema check, one engine; the chain admission last verified stays in memory), and a trained model
is loaded once for evaluation and the audit (:meth:`RunContext.model`). Each stage still hands back
the ledger's connections when it is done (``Ledger.dispose`` empties the engine's pool, the engine
stays usable), so a run holds no database connection while it trains. A new workspace
(``DPOPS_HOME``, ``DPOPS_LEDGER_URL``, ``MLFLOW_TRACKING_URI`` changed) gets a new context; the
old one is closed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dpops.config.workspace import Workspace, workspace
from dpops.ledger.store import Ledger
from dpops.ledger.workspace import open_ledger
from dpops.models import hf

#: A loaded model: (network, tokenizer, its metadata), as :func:`dpops.models.hf.load` returns it.
Loaded = tuple[Any, Any, dict[str, Any]]


@dataclass
class RunContext:
    workspace: Workspace
    _ledger: Optional[Ledger] = None
    _model: Optional[tuple[tuple[str, int, int], Loaded]] = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ledger(self) -> Ledger:
        """The workspace's ledger, opened on first use (with its anchor log)."""
        with self._lock:
            if self._ledger is None:
                self._ledger = open_ledger(self.workspace)
            return self._ledger

    def model(self, model_dir: str | Path) -> Loaded:
        """The trained model in ``model_dir``, loaded once: again only if its weights file changed.
        Read-only use (evaluation, scoring canaries); the last model alone is kept."""
        weights = Path(model_dir).resolve() / hf.WEIGHTS
        stat = weights.stat()
        key = (str(weights), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if self._model is None or self._model[0] != key:
                self._model = (key, hf.load(Path(model_dir)))
            return self._model[1]

    def close(self) -> None:
        with self._lock:
            if self._ledger is not None:
                self._ledger.dispose()
            self._ledger, self._model = None, None


_current: Optional[RunContext] = None
_current_lock = threading.Lock()


def current(ws: Optional[Workspace] = None) -> RunContext:
    """This process's context for ``ws`` (default: the workspace the environment names now)."""
    global _current
    ws = ws or workspace()
    with _current_lock:
        if _current is None or _current.workspace != ws:
            if _current is not None:
                _current.close()
            _current = RunContext(ws)
        return _current
