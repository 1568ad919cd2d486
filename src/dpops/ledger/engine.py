"""Database engines and bounds: the SQLite and PostgreSQL engines, lock timeouts turned into
:class:`~dpops.errors.LedgerUnavailableError`, and the column bounds every write checks first.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import numpy as np
from sqlalchemy import (
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

from dpops.errors import (
    ConfigError,
    LedgerUnavailableError,
)
from dpops.ledger.states import (
    MAX_INT,
    MAX_NAME,
)

_SPEC_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _check_name(what: str, value: Optional[str], limit: int = MAX_NAME, *, optional: bool = False) -> None:
    """Refuse, before any SQL, a name the ledger's ``String(limit)`` column cannot hold."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ConfigError(f"field {what!r} must be a non-empty name of at most {limit} characters"
                          + (f" (found {len(value)})" if isinstance(value, str) and value.strip() else ""))


def _check_count(what: str, value: Any, *, low: int = 1) -> None:
    """Refuse, before any SQL, an integer the ledger's 32-bit ``Integer`` columns cannot hold."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= MAX_INT:
        raise ConfigError(f"field {what!r} must be an integer in [{low}, {MAX_INT}] (the ledger's integer columns). "
                          f"Found {value!r:.40}.")


def _pg_engine(url: str, lock_timeout: float) -> Engine:
    """A PostgreSQL engine whose connections wait at most ``lock_timeout`` for a lock
    (``lock_timeout``, set on each new connection) and about as long to connect."""
    from sqlalchemy.engine import make_url

    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in make_url(url).query:
        connect_args["connect_timeout"] = max(2, int(np.ceil(lock_timeout)))  # libpq: whole seconds, at least 2
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, false)", (f"{int(np.ceil(lock_timeout * 1000))}ms",))
        dbapi_conn.commit()

    return engine


#: SQLSTATEs of a PostgreSQL server that is there but cannot serve now: lock_timeout ran out,
#: the server is shutting down or starting up.
_PG_UNAVAILABLE = {"55P03", "57P01", "57P02", "57P03"}


def _unavailable(exc: BaseException, dialect: str) -> Optional[str]:
    """Why ``exc`` (a DBAPI error) means the ledger is unavailable ('locked', 'unreachable'), else None."""
    if dialect == "sqlite":
        message = str(exc).lower()
        if "locked" in message or "busy" in message:
            return "locked"
        return "unreachable" if "unable to open" in message else None
    import psycopg

    if not isinstance(exc, psycopg.OperationalError):
        return None
    state = getattr(exc, "sqlstate", None)
    if state == "55P03":
        return "locked"
    if state is None or state.startswith("08") or state in _PG_UNAVAILABLE:
        return "unreachable"
    return None


def _raise_unavailable(engine: Engine, lock_timeout: float) -> None:
    """Turn the engine's lock timeouts and connection failures into LedgerUnavailableError.

    One hook on the engine (SQLAlchemy's ``handle_error``), so every entry point of the ledger,
    from the schema check in the constructor to each read and write, reports one clear line
    (exit code 4) instead of a driver traceback. The message names the ledger without its password
    and never the driver's text.
    """
    where = engine.url.render_as_string(hide_password=True)

    @event.listens_for(engine, "handle_error")
    def _handle(context: Any) -> None:
        if context.is_pre_ping:  # let the pool reconnect
            return
        why = _unavailable(context.original_exception, engine.dialect.name)
        if why is None:
            return
        from dpops.config.workspace import LEDGER_LOCK_TIMEOUT_ENV

        if why == "locked":
            message = (f"ledger {where} is unavailable: it stayed locked by another process for {lock_timeout:g} s "
                       f"({LEDGER_LOCK_TIMEOUT_ENV}). Nothing changed; retry, or raise {LEDGER_LOCK_TIMEOUT_ENV}.")
        else:
            message = (f"ledger {where} is unavailable: it could not be reached "
                       f"({type(context.original_exception).__name__}; connection timeout {lock_timeout:g} s, "
                       f"{LEDGER_LOCK_TIMEOUT_ENV}). Nothing changed.")
        raise LedgerUnavailableError(message) from context.original_exception
