"""Serving only what the gate promoted: every serving path (``dpops predict``, ``dpops serve``) goes through :func:`check`.

An MLflow alias is a pointer anyone with registry access can move (the UI's "Promote model", or
``MlflowClient().set_registered_model_alias``), so it is only used to find a version. The
version's model is then downloaded once, the SHA-256 of its weight file computed, and the ledger
asked (:func:`dpops.registry.gate.serving_reasons`) whether the gate promoted exactly that model, version
and alias, with exactly those weights. The caller then loads or serves that downloaded copy, the
bytes that were hashed, and never resolves the alias or the registry again: nothing can be swapped
between the check and the load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dpops.config.workspace import Workspace
from dpops.ledger.workspace import open_ledger
from dpops.registry import gate, tracking


@dataclass(frozen=True)
class Checked:
    """The outcome of :func:`check`: the version the alias points to, its checked local copy, and
    why it must not be served (empty: serve ``local_path``)."""

    model_name: str
    alias: str
    version: Optional[str]
    local_path: Optional[Path]
    reasons: list[str]

    @property
    def label(self) -> str:
        return f"model {self.model_name!r} alias {self.alias!r}" + (f" (version {self.version})" if self.version else "")


def check(ws: Workspace, model_name: str, alias: str, dst: Path) -> Checked:
    """Resolve ``alias`` to a version, download that version into ``dst``, and check it against the ledger."""
    from mlflow.exceptions import MlflowException

    mlflow, client = tracking._client(ws)
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return Checked(model_name, alias, None, None, [f"MLflow has no alias {alias!r} on a version of model {model_name!r}"])
    version = str(mv.version)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model_name}/{version}", dst_path=str(dst),
                                                         tracking_uri=ws.tracking_uri))
        digest = tracking.weights_sha256(tracking.pyfunc_weights_dir(local))
    except (MlflowException, OSError):
        return Checked(model_name, alias, version, None, [
            f"model {model_name}/{version} could not be read from the registry with its weight file ({tracking.WEIGHTS_FILE})"])
    if ws.ledger_url.startswith("sqlite:///") and not Path(ws.ledger_url[len("sqlite:///"):]).exists():
        return Checked(model_name, alias, version, local, [f"no ledger at {ws.ledger_url}: the gate never promoted anything"])
    ledger = open_ledger(ws)
    try:
        reasons = gate.serving_reasons(ledger, model_name, version, alias, digest, mlflow_run_id=mv.run_id or "(none)")
    finally:
        ledger.dispose()
    return Checked(model_name, alias, version, local, reasons)


def scoring_server_command(local_path: Path, *, host: str, port: int) -> list[str]:
    """MLflow's scoring server for a checked local copy of a model, in this Python environment."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(local_path), "--env-manager", "local",
            "-h", host, "-p", str(port)]


def run_scoring_server(local_path: Path, *, host: str, port: int) -> int:
    """Run the scoring server as a child in its own process group and wait for it; SIGINT and
    SIGTERM are passed on to the whole group (MLflow starts the web server as a child of its own),
    so stopping ``dpops serve`` stops everything it started. Returns the server's exit status
    (0 when it was stopped that way)."""
    proc = subprocess.Popen(scoring_server_command(local_path, host=host, port=port), start_new_session=True)
    stopped = []

    def forward(signum: int, _frame: object) -> None:
        stopped.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:  # the group has already exited
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code < 0:  # ended by a signal: 0 when it was ours to stop it, else 128 + the signal, as a shell reports it
        return 0 if stopped else 128 - code
    return code
