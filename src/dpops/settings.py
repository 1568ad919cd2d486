"""Where dpops keeps its state. Read from the environment when asked, never at import.

=====================  ==============================================  ==========================
variable               meaning                                         default
=====================  ==============================================  ==========================
``DPOPS_HOME``         workspace directory                             ``./.dpops``
``DPOPS_LEDGER_URL``   SQLAlchemy URL of the ledger                    ``sqlite:///$DPOPS_HOME/ledger.db``
``MLFLOW_TRACKING_URI`` MLflow tracking store                          ``sqlite:///$DPOPS_HOME/mlflow.db``
=====================  ==============================================  ==========================
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

#: What every dpops process sets unless already set: telemetry off, no downloads, quiet progress output.
QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Prefect shows dpops's own log lines (progress, figures; never records) in its run logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "dpops",
    # Prefect waits 20 s for its in-process (ephemeral) server by default; a first start on a busy
    # 2-core machine (a fresh database to migrate) took longer and the flow failed before any stage.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


@dataclass(frozen=True)
class Workspace:
    root: Path
    ledger_url: str
    tracking_uri: str

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    def ui_command(self) -> str:
        """The exact command that opens the MLflow UI on this workspace's runs."""
        mlflow = Path(sys.executable).parent / "mlflow"
        exe = str(mlflow) if mlflow.exists() else "mlflow"
        return f"{exe} ui --backend-store-uri {self.tracking_uri} --port 5000"


def workspace() -> Workspace:
    root = Path(os.environ.get("DPOPS_HOME", ".dpops")).resolve()
    return Workspace(
        root=root,
        ledger_url=os.environ.get("DPOPS_LEDGER_URL", f"sqlite:///{root / 'ledger.db'}"),
        tracking_uri=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}"),
    )


def apply_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
