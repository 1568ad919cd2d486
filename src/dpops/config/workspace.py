"""Where dpops keeps its state. Read from the environment when asked, never at import.

=====================  ==============================================  ==========================
variable               meaning                                         default
=====================  ==============================================  ==========================
``DPOPS_HOME``         workspace directory                             ``./.dpops``
``DPOPS_LEDGER_URL``   SQLAlchemy URL of the ledger                    ``sqlite:///$DPOPS_HOME/ledger.db``
``MLFLOW_TRACKING_URI`` MLflow tracking store                          ``sqlite:///$DPOPS_HOME/mlflow.db``
``DPOPS_FINGERPRINT_KEY`` key of the data fingerprints (64 hex digits)  ``$DPOPS_HOME/fingerprint.key``
``DPOPS_ANCHOR_KEY``   key of the ledger's anchors (64 hex digits)     ``$DPOPS_HOME/anchor.key``
``DPOPS_ANCHOR_LOG``   the ledger's anchor log (see dpops.anchors)     ``$DPOPS_HOME/anchors.jsonl``
``DPOPS_LEDGER_LOCK_TIMEOUT`` seconds to wait for the ledger's lock      ``30``
=====================  ==============================================  ==========================

The fingerprint key (:func:`fingerprint_key`) is a workspace secret: dpops publishes an
HMAC-SHA256 of each training file under it instead of a plain hash (which would let someone
holding all records but one test guesses of the last offline). It never goes to MLflow, Prefect,
the ledger or a log. One machine needs nothing: the key file is created on first use, mode 0600.
Where stages run on several machines (a ``dp-train`` worker on a GPU pool, torchrun on another
node), every machine must use the same key, or the train stage refuses the data as changed: set
``DPOPS_FINGERPRINT_KEY`` from the deployment's secret store on each (``openssl rand -hex 32``).
"""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
    def fingerprint_key_file(self) -> Path:
        return self.root / "fingerprint.key"

    @property
    def anchor_key_file(self) -> Path:
        """The key of the ledger's anchors (see :mod:`dpops.anchors`), unless ``DPOPS_ANCHOR_KEY`` is set."""
        return self.root / "anchor.key"

    @property
    def anchor_log(self) -> Path:
        """The ledger's anchor log: ``DPOPS_ANCHOR_LOG`` when set, else ``$DPOPS_HOME/anchors.jsonl``."""
        return Path(os.environ.get("DPOPS_ANCHOR_LOG") or self.root / "anchors.jsonl").resolve()

    @property
    def steward(self) -> Path:
        """Steward-only output (mode 0700): row-level detail that must not reach Prefect or MLflow."""
        return self.root / "steward"

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


#: Environment variable holding the fingerprint key, hex; overrides the workspace's key file.
FINGERPRINT_KEY_ENV = "DPOPS_FINGERPRINT_KEY"
#: Bytes of a fingerprint key (the HMAC-SHA256 block size allows up to 64; 32 is SHA-256's strength).
FINGERPRINT_KEY_BYTES = 32


def key_from_env(name: str, n_bytes: int) -> Optional[bytes]:
    """The key an environment variable holds as hex (None when it is unset).

    Raises:
        ConfigError: the variable is not ``2 * n_bytes`` hex digits (its value is never shown).
    """
    from dpops.errors import ConfigError

    value = os.environ.get(name)
    if value is None:
        return None
    try:
        key = bytes.fromhex(value.strip())
    except ValueError:
        key = b""
    if len(key) != n_bytes:
        raise ConfigError(f"environment variable {name} must be {2 * n_bytes} hex digits (e.g. from `openssl rand -hex 32`)")
    return key


def fingerprint_key(ws: Workspace | None = None) -> bytes:
    """The workspace's secret key for data fingerprints: ``DPOPS_FINGERPRINT_KEY`` (hex) when set,
    else ``$DPOPS_HOME/fingerprint.key``, created (32 random bytes, mode 0600) on first use.

    Raises:
        ConfigError: the variable is not 64 hex digits, or the key file is malformed or readable
            by others (its value is never shown).
    """
    from dpops.errors import ConfigError

    key = key_from_env(FINGERPRINT_KEY_ENV, FINGERPRINT_KEY_BYTES)
    if key is not None:
        return key
    path = (ws or workspace()).fingerprint_key_file
    if not path.exists():
        _create_key_file(path)
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"{path}: the fingerprint key is readable by others; `chmod 600 {path}`")
    key = path.read_bytes()
    if len(key) != FINGERPRINT_KEY_BYTES:
        raise ConfigError(f"{path}: a fingerprint key file holds exactly {FINGERPRINT_KEY_BYTES} bytes")
    return key


def _create_key_file(path: Path) -> None:
    """Write a fresh key to a private temporary file, then link it into place: a process that
    loses the race to create it reads the winner's complete key, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(FINGERPRINT_KEY_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)


#: Environment variable: seconds a ledger operation waits for the ledger's lock (and for a
#: PostgreSQL connection) before it gives up with LedgerUnavailableError (exit code 4).
LEDGER_LOCK_TIMEOUT_ENV = "DPOPS_LEDGER_LOCK_TIMEOUT"
DEFAULT_LEDGER_LOCK_TIMEOUT = 30.0


def ledger_lock_timeout() -> float:
    """``DPOPS_LEDGER_LOCK_TIMEOUT`` in seconds (default 30): how long a ledger operation waits for
    a lock another process holds, so a frozen holder costs a clear error, not a hang.

    Raises:
        ConfigError: the variable is not a positive finite number of seconds (at most a day).
    """
    import math

    from dpops.errors import ConfigError

    value = os.environ.get(LEDGER_LOCK_TIMEOUT_ENV)
    if value is None or not value.strip():
        return DEFAULT_LEDGER_LOCK_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (0 < seconds <= 86400):  # also refuses nan and inf
        raise ConfigError(f"environment variable {LEDGER_LOCK_TIMEOUT_ENV} must be a number of seconds in (0, 86400]")
    return seconds


def apply_quiet_env() -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
