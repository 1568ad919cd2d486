"""The privacy-budget ledger: the system of record for privacy spend.

Semantics (see docs/architecture.md, "The ledger"):

* A **dataset** is registered once with its unit of privacy, delta and epsilon cap. New data
  versions bring no new budget.
* A **charge** is one use of the data by a mechanism, stored fully enough to recompute its privacy
  loss (:class:`~dpops.privacy.accounting.SubsampledGaussian` + clipping bound + lineage). Charge rows are
  written once and never updated.
* A charge's **state** is the last of its events: ``reserved`` (admitted, no data read) ->
  ``running`` (written before the first private record is read) -> ``committed`` (charged for the
  steps actually run), or ``failed_charged`` (the run died after reading data: charged in full).
  Only a ``reserved`` charge may be ``released``.
* The cumulative epsilon of a dataset is recomputed from its charges by the RDP privacy filter of
  :mod:`dpops.privacy.accounting`; per-run epsilons are never added. Admission and budgets read the
  charges through the **spend index** (per scope and mechanism, the steps counted; RDP is linear
  in steps, so this is exact), written in the same transaction as each event and recomputed from
  the charges and events by :meth:`Ledger.verify`.
* **Admission** is one write transaction holding the dataset's lock (``BEGIN IMMEDIATE`` on
  SQLite, ``SELECT ... FOR UPDATE`` on PostgreSQL), so concurrent flows cannot overspend. On
  PostgreSQL it takes three round trips under the lock: lock, read the totals, one write.
* Every state change is an **event** appended to a per-dataset hash chain; :meth:`Ledger.verify`
  detects an edited, deleted or reordered row.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import numpy as np
from sqlalchemy import (
    Double,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from dpops.errors import BudgetExceededError, ConfigError, LedgerError, LedgerUnavailableError
from dpops.ledger.states import (  # noqa: F401  (the store's vocabulary, re-exported)
    ADD_REMOVE,
    ANCHORED,
    BINDING_FIELDS,
    COMMITTED,
    DEFAULT_LEASE_SECONDS,
    EVIDENCE,
    EVIDENCE_FIGURES,
    EXPIRED,
    FAILED_CHARGED,
    FINISHED,
    GATE_KEYS,
    GENESIS,
    MAX_EPSILON_CAP,
    MAX_ID,
    MAX_INT,
    MAX_NAME,
    MODEL_BOUND,
    PROGRESS,
    RELEASED,
    RESERVED,
    RUNNING,
    TRANSITIONS,
    UNCHARGED,
    BlockBudget,
    ChainHead,
    Charge,
    DatasetBudget,
    charge_to_dict,
)
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian

if TYPE_CHECKING:
    from dpops.ledger.anchors import AnchorLog

_log = logging.getLogger("dpops.ledger")

#: PostgreSQL advisory lock serialising model bindings across datasets (one charge per model version).
_PG_BINDING_LOCK = 7_274_002
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 7_274_001
_PG_REGISTER_LOCK = 7_274_003  # (7_274_002 serialises model bindings)
#: First key of the two-key PostgreSQL transaction lock on one data version (second: its hash).
_PG_DATA_VERSION_LOCK = 7_274_004


def upgrade(engine: Engine) -> None:
    """Bring the ledger's schema to the newest Alembic revision (idempotent, safe to race).

    The migration runs in one transaction holding a database-wide lock: ``BEGIN IMMEDIATE`` on
    SQLite, an advisory transaction lock on PostgreSQL.
    """
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest Alembic revision this code ships (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def schema_revision(engine: Engine) -> Optional[str]:
    """The ledger schema's current Alembic revision (None for an empty database). Reads only."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _migrate_message(engine: Engine, current: Optional[str]) -> str:
    user = engine.url.username or "this role"
    return (f"the ledger's schema is at revision {current or 'none'} and this dpops needs {head_revision()}; "
            f"role {user!r} may not migrate it: run `dpops ledger migrate` as the admin role "
            "(DPOPS_LEDGER_ADMIN_URL), then open the ledger again")


def ensure_schema(engine: Engine) -> None:
    """Upgrade the schema only when it is behind this code, so that an open at head runs no DDL.

    The pipeline role (see :func:`grant_pipeline_role`) owns no table and cannot migrate: when the
    schema is behind it gets a LedgerError telling it to run ``dpops ledger migrate`` as the admin.
    A fresh SQLite workspace is still created here, on first open.
    """
    from sqlalchemy.exc import DBAPIError

    current: Optional[str] = None
    try:
        current = schema_revision(engine)
        if current == head_revision():
            return
        if engine.dialect.name == "postgresql" and current is not None:
            with engine.connect() as conn:  # whoever does not own the schema's tables may not migrate it
                may = conn.scalar(text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                                       "WHERE oid = to_regclass('alembic_version')"))
            if may is False:
                raise LedgerError(_migrate_message(engine, current))
        upgrade(engine)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            raise LedgerError(_migrate_message(engine, current)) from None
        raise


#: Columns the pipeline role may UPDATE, by table: the chain head and the derived spend index, which
#: the ledger moves with each event. ``blocks.id`` is there only because PostgreSQL's ``SELECT ... FOR
#: UPDATE`` (admission locks the blocks a run reads) needs an UPDATE privilege on some column; the
#: append-only triggers refuse every UPDATE of ``blocks`` all the same. Every other table the role
#: may only read and append to.
PIPELINE_UPDATES: dict[str, tuple[str, ...]] = {
    "datasets": ("head_seq", "head_hash"),
    "blocks": ("id",),
    "charge_states": ("state", "steps_counted"),
    "spend_totals": ("steps",),
}

_SPEC_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def pipeline_role_sql(engine: Engine, role: str) -> list[str]:
    """The SQL that makes ``role`` the ledger's pipeline role on PostgreSQL (see
    :func:`grant_pipeline_role`); reads the catalog, changes nothing. For a DBA to review or run."""
    if engine.dialect.name != "postgresql":
        raise ConfigError("a pipeline role exists only on PostgreSQL (SQLite has no roles)")
    if not _ROLE_NAME.fullmatch(role):
        raise ConfigError("--grant: a role name is 1-63 lower-case letters, digits or underscores, not starting with a digit")
    with engine.connect() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        tables = [t for t in (*Base.metadata.tables, "alembic_version")
                  if conn.scalar(text("SELECT to_regclass(:t)"), {"t": t}) is not None]
        present = {(t, c) for t, c in conn.execute(text(  # a ledger behind head lacks the newer columns
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"))}
        sequences = sorted({s for t in tables for c in ([] if t == "alembic_version" else Base.metadata.tables[t].columns)
                            if (t, c.name) in present
                            and (s := conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": t, "c": c.name}))})
        schema = conn.scalar(text("SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass('alembic_version')"))
    if not tables or schema is None:
        raise LedgerError("the ledger has no schema yet: run `dpops ledger migrate` first")
    q = f'"{role}"'
    sql = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {q} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS; END IF; END $$",
        f'GRANT CONNECT ON DATABASE "{database}" TO {q}',
        f"GRANT USAGE ON SCHEMA {schema} TO {q}",
    ]
    for t in tables:
        sql.append(f"REVOKE ALL ON TABLE {t} FROM {q}")  # exactly what follows, also on a rerun
        if t == "alembic_version":
            sql.append(f"GRANT SELECT ON TABLE {t} TO {q}")
            continue
        sql.append(f"GRANT SELECT, INSERT ON TABLE {t} TO {q}")
        if t in PIPELINE_UPDATES:
            sql.append(f"GRANT UPDATE ({', '.join(PIPELINE_UPDATES[t])}) ON TABLE {t} TO {q}")
    sql += [f"GRANT USAGE, SELECT ON SEQUENCE {s} TO {q}" for s in sequences]
    return sql


def grant_pipeline_role(engine: Engine, role: str) -> list[str]:
    """Create (if missing) the PostgreSQL role the pipeline connects as, and grant it exactly what the
    ledger writes: SELECT on every ledger table, INSERT on them, UPDATE only of
    :data:`PIPELINE_UPDATES`, and the tables' sequences. It owns nothing, so it cannot DROP,
    TRUNCATE or ALTER a table, disable or drop a trigger, or migrate; as no superuser it cannot set
    ``session_replication_role``. Idempotent; rerun it after each migration that adds a table.
    ``engine`` connects as the admin (the tables' owner). Returns the statements run.

    Refuses a role that could take the owner's rights: a superuser, a CREATEROLE role, or a member
    of the tables' owner.
    """
    sql = pipeline_role_sql(engine, role)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        # A non-owner's GRANT only warns ("no privileges were granted"): refuse it here instead.
        if not conn.scalar(text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                                "WHERE oid = to_regclass('alembic_version')")):
            raise LedgerError(f"role {engine.url.username or 'this role'!r} does not own the ledger's tables and may not "
                              "grant on them: run `dpops ledger migrate` as the admin role (DPOPS_LEDGER_ADMIN_URL)")
        for statement in sql:
            conn.exec_driver_sql(statement)
        unsafe = conn.execute(text(
            "SELECT r.rolsuper OR r.rolcreaterole OR pg_has_role(r.oid, c.relowner, 'MEMBER') FROM pg_roles r, pg_class c "
            "WHERE r.rolname = :role AND c.oid = to_regclass('alembic_version')"), {"role": role}).scalar()
        if unsafe:  # raised inside the transaction: nothing above is kept
            raise LedgerError(f"role {role!r} is a superuser, may create roles, or is a member of the ledger's owner: "
                              "it could drop the record; use a plain role")
    return sql


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    unit: Mapped[str] = mapped_column(String(20))
    contribution_bound: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    delta: Mapped[float] = mapped_column(Double)
    epsilon_cap: Mapped[float] = mapped_column(Double)
    accountant: Mapped[str] = mapped_column(String(50))
    #: Canonical JSON of the filter's orders and delta shares (``rdp-filter-v2``); NULL for v1 (migration 0007).
    filter_spec: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[str] = mapped_column(String(40))
    # Head of the event chain: lets verify() notice a truncated tail.
    head_seq: Mapped[int] = mapped_column(Integer, default=0)
    head_hash: Mapped[str] = mapped_column(String(64), default=GENESIS)


class ChargeRow(Base):
    """One use of a dataset. Written once at reservation, never updated."""

    __tablename__ = "charges"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    kind: Mapped[str] = mapped_column(String(50))
    sampler: Mapped[str] = mapped_column(String(20))
    noise_multiplier: Mapped[float] = mapped_column(Double)
    sample_rate: Mapped[float] = mapped_column(Double)
    steps_planned: Mapped[int] = mapped_column(Integer)
    max_grad_norm: Mapped[float] = mapped_column(Double)
    unit: Mapped[str] = mapped_column(String(20))
    neighbouring: Mapped[str] = mapped_column(String(20))
    n_records: Mapped[int] = mapped_column(Integer)
    job: Mapped[str] = mapped_column(String(200))
    data_version: Mapped[str] = mapped_column(String(200))
    flow_run_id: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    code_version: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    created_at: Mapped[str] = mapped_column(String(40))
    lease_expires_at: Mapped[str] = mapped_column(String(40))
    #: Digest of the run's job and dataset configs (:class:`dpops.config.spec.RunSpec`); NULL before migration 0008.
    spec_hash: Mapped[Optional[str]] = mapped_column(String(80), nullable=True)


class BlockRow(Base):
    """An append-only partition of a dataset (e.g. one month's arrivals) with its own cap.

    Every record lives in exactly one block, so charges on disjoint blocks compose in parallel
    (Sage, Lecuyer et al. 2019): a run is charged to each block it reads, and each block has its
    own privacy filter.
    """

    __tablename__ = "blocks"
    __table_args__ = (UniqueConstraint("dataset_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    name: Mapped[str] = mapped_column(String(200))
    epsilon_cap: Mapped[float] = mapped_column(Double)
    n_records: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[str] = mapped_column(String(40))


class ChargeBlockRow(Base):
    """Which blocks a charge reads. A charge with no rows here read the whole dataset."""

    __tablename__ = "charge_blocks"

    charge_id: Mapped[str] = mapped_column(ForeignKey("charges.id"), primary_key=True)
    block_id: Mapped[int] = mapped_column(ForeignKey("blocks.id"), primary_key=True)


class EventRow(Base):
    """Append-only, hash-chained log of every state change, per dataset."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("dataset_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    seq: Mapped[int] = mapped_column(Integer)
    charge_id: Mapped[Optional[str]] = mapped_column(String(36), nullable=True)
    kind: Mapped[str] = mapped_column(String(40))
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(40))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class UserBlockRow(Base):
    """Which block a user of a partitioned unit-'user' dataset was charged in (migration 0006).

    ``user_key`` is HMAC-SHA256 of the user id under the workspace fingerprint key, never the raw
    id. Append-only: a user mapped to one block is refused in any other, in every data version.
    """

    __tablename__ = "user_blocks"
    __table_args__ = (UniqueConstraint("dataset_id", "user_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    user_key: Mapped[str] = mapped_column(String(64))
    block: Mapped[str] = mapped_column(String(64))


class ChargeStateRow(Base):
    """Derived: a charge's current state and the steps it counts now (see migration 0003).

    The events are the record; this row is rewritten with each state event, in the same
    transaction, so admission need not replay the log. :meth:`Ledger.verify` recomputes it.
    """

    __tablename__ = "charge_states"

    charge_id: Mapped[str] = mapped_column(ForeignKey("charges.id"), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    state: Mapped[str] = mapped_column(String(20))
    steps_counted: Mapped[int] = mapped_column(Integer)
    lease_expires_at: Mapped[str] = mapped_column(String(40))


class SpendTotalRow(Base):
    """Derived: counted steps per dataset, scope and mechanism (see migration 0003).

    Scope ``""`` holds charges that read the whole dataset, a block's name the charges that read
    that block. RDP is linear in steps, so a scope's filter state is exactly the sum over its rows
    of ``steps * RDP_one_step(sigma, q)``. :meth:`Ledger.verify` recomputes these from the charges.
    """

    __tablename__ = "spend_totals"
    __table_args__ = (UniqueConstraint("dataset_id", "scope", "noise_multiplier", "sample_rate"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    scope: Mapped[str] = mapped_column(String(200))
    noise_multiplier: Mapped[float] = mapped_column(Double)
    sample_rate: Mapped[float] = mapped_column(Double)
    steps: Mapped[int] = mapped_column(Integer)
    #: JSON: RDP of one step of (sigma, q) at the dataset's filter orders (migrations 0004, 0007).
    rdp_per_step: Mapped[Optional[str]] = mapped_column(Text, nullable=True)


#: Scope of the charges that read the whole dataset (not one of its blocks).
WHOLE = ""


@functools.lru_cache(maxsize=65536)
def _mechanism(sigma: float, q: float, steps: int) -> SubsampledGaussian:
    return SubsampledGaussian(sigma, q, steps)  # validated once per distinct value


def _rdp_json(f: filters.PrivacyFilter, sigma: float, q: float) -> str:
    """The stored one-step RDP curve of (sigma, q) at the filter's orders (see migration 0004)."""
    return json.dumps(f.one_step(sigma, q))


def _epsilon(f: filters.PrivacyFilter, base_rdp: np.ndarray, new: Optional[SubsampledGaussian], delta: float) -> float:
    """The filter's guaranteed epsilon with state ``base_rdp``, plus ``new`` if given."""
    total = base_rdp if new is None else base_rdp + new.rdp(f.orders)
    return f.epsilon_from_rdp(total, delta=delta)


@functools.lru_cache(maxsize=256)
def _filter(accountant: Optional[str], spec: Optional[str]) -> filters.PrivacyFilter:
    """The privacy filter a dataset was registered with (``datasets.accountant``, ``.filter_spec``).

    Raises:
        LedgerError: a filter this code does not implement, or a v2 spec that is not a valid one.
    """
    if accountant not in filters.FILTERS:
        raise LedgerError(f"privacy filter {accountant!r}, which this code does not implement (it implements "
                          f"{', '.join(repr(n) for n in filters.FILTERS)})")
    try:
        return filters.PrivacyFilter.from_spec(accountant, None if spec is None else json.loads(spec))
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"privacy filter {accountant!r} with a stored spec that is not valid ({exc})") from None


def _now(offset_seconds: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_seconds)).isoformat(timespec="microseconds")


def _event_hash(dataset: str, seq: int, kind: str, charge_id: Optional[str], payload: str, created_at: str, prev: str) -> str:
    body = json.dumps([dataset, seq, kind, charge_id, payload, created_at, prev], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


#: Fields of a charge row besides its id and dataset, in the order of its `reserved` event.
CHARGE_FIELDS = (
    "kind", "sampler", "noise_multiplier", "sample_rate", "steps_planned", "max_grad_norm", "unit", "neighbouring",
    "n_records", "job", "data_version", "flow_run_id", "code_version", "created_at", "lease_expires_at", "spec_hash",
)


def _charge_payload(row: Any) -> dict[str, Any]:
    """The immutable fields of a charge row, copied into its `reserved` event for verify()."""
    return {name: getattr(row, name) for name in CHARGE_FIELDS}


def _charge_fields(charge: Charge) -> dict[str, Any]:
    """The row fields of a new charge (what :func:`_charge_payload` reads back from its row)."""
    return {
        "kind": accounting.KIND_SUBSAMPLED_GAUSSIAN,
        "sampler": accounting.SAMPLER_POISSON,
        "noise_multiplier": float(charge.mechanism.noise_multiplier),
        "sample_rate": float(charge.mechanism.sample_rate),
        "steps_planned": int(charge.mechanism.steps),
        "max_grad_norm": charge.max_grad_norm,
        "unit": charge.unit,
        "neighbouring": charge.neighbouring,
        "n_records": charge.n_records,
        "job": charge.job,
        "data_version": charge.data_version,
        "flow_run_id": charge.flow_run_id,
        "code_version": charge.code_version,
        "created_at": charge.created_at,
        "lease_expires_at": charge.lease_expires_at,
        "spec_hash": charge.spec_hash,
    }


@dataclass
class _Locked:
    """A dataset row as the write path needs it; the chain head advances with each appended event."""

    id: int
    name: str
    unit: str
    delta: float
    epsilon_cap: float
    head_seq: int
    head_hash: str
    partitioned: bool
    accountant: Optional[str] = None
    filter_spec: Optional[str] = None

    @property
    def privacy_filter(self) -> filters.PrivacyFilter:
        """The dataset's filter, as its row names it (admission checks the row against the chain)."""
        return _filter(self.accountant, self.filter_spec)


_DATASETS = DatasetRow.__table__
_CHARGES = ChargeRow.__table__
_BLOCKS = BlockRow.__table__
_EVENTS = EventRow.__table__
_USER_BLOCKS = UserBlockRow.__table__
_STATES = ChargeStateRow.__table__
_TOTALS = SpendTotalRow.__table__


# --------------------------------------------------------------------------- bounds and availability


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
    from the schema upgrade in the constructor to each read and write, reports one clear line
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


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """The ledger behind a SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``).

    Args:
        url: database URL.
        create: create missing tables, or upgrade a schema behind this code (no DDL at head; see
            :func:`ensure_schema`).
        anchors: where to write the chain head after each commit, failure, evidence and gate
            decision (:mod:`dpops.ledger.anchors`); None writes none. The CLI and the stages pass the
            workspace's log.
    """

    def __init__(self, url: str, *, create: bool = True, lease_seconds: float = DEFAULT_LEASE_SECONDS,
                 anchors: Optional["AnchorLog"] = None, lock_timeout: Optional[float] = None) -> None:
        from dpops.config.workspace import ledger_lock_timeout

        self.url = url
        self.lease_seconds = lease_seconds
        self.anchors = anchors
        #: Seconds to wait for a lock (or a connection) before LedgerUnavailableError; default
        #: ``DPOPS_LEDGER_LOCK_TIMEOUT``.
        self.lock_timeout = ledger_lock_timeout() if lock_timeout is None else float(lock_timeout)
        self.engine = self._make_engine(url, self.lock_timeout)
        _raise_unavailable(self.engine, self.lock_timeout)
        #: Per dataset id, the chain admission last verified: (head seq, head hash, its replay).
        #: Lives in this process only; admission replays just the events appended since.
        self._verified: dict[int, tuple[int, str, _Chain]] = {}
        if create:
            ensure_schema(self.engine)

    @staticmethod
    def _make_engine(url: str, lock_timeout: float = 30.0) -> Engine:
        if url.startswith("sqlite"):
            # pysqlite's timeout is SQLite's busy timeout: how long BEGIN IMMEDIATE waits for the lock.
            engine = create_engine(url, connect_args={"timeout": lock_timeout})

            @event.listens_for(engine, "connect")
            def _connect(dbapi_conn: Any, _record: Any) -> None:
                # Let SQLAlchemy, not pysqlite, decide when transactions begin ...
                dbapi_conn.isolation_level = None
                dbapi_conn.execute("PRAGMA foreign_keys=ON")

            @event.listens_for(engine, "begin")
            def _begin(conn: Connection) -> None:
                # ... and make every transaction take the write lock up front, so a
                # read-check-write admission cannot interleave with another one.
                conn.exec_driver_sql("BEGIN IMMEDIATE")

            return engine
        return _pg_engine(url, lock_timeout)

    def dispose(self) -> None:
        self.engine.dispose()

    def _anchor(self, ds: _Locked, kind: str) -> ChainHead:
        """The chain head ``ds`` moved to, anchored outside the database when an anchor log is set.

        Called after the transaction committed: a failure to write the anchor loses nothing of the
        ledger. It is logged; `verify` with the anchors then sees a gap, not a mismatch.
        """
        head = ChainHead(ds.name, ds.head_seq, ds.head_hash)
        if self.anchors is not None:
            try:
                self.anchors.append(head.dataset, head.seq, head.hash, kind)
            except Exception as exc:  # the ledger's write is committed; the anchor is only missing
                _log.warning("dataset %r: event %d (%s) is committed, but its anchor is missing: %s: %s",
                             head.dataset, head.seq, kind, type(exc).__name__, exc)
        return head

    # ----------------------------------------------------------------- internals
    #
    # Writes go through SQLAlchemy Core on one Connection (no ORM unit of work): admission holds
    # the dataset's lock for a handful of short statements, which is what bounds throughput when
    # many flows reserve against one dataset.

    @property
    def _pg(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def _lock_dataset(self, conn: Connection, name: Optional[str] = None, *, dataset_id: Optional[int] = None,
                      asynchronous_commit: bool = False) -> _Locked:
        """The dataset's row, locked for the rest of the transaction (by name or id).

        SQLite's write lock is already held (``BEGIN IMMEDIATE``); PostgreSQL locks the row.
        Rows of other tables must be read in later statements: a PostgreSQL statement that waited
        for the lock still sees them as of its start (READ COMMITTED), i.e. before the last holder's
        commit.

        Args:
            asynchronous_commit: on PostgreSQL, let this transaction's COMMIT return before its WAL
                is flushed (``synchronous_commit`` off for this transaction only; set in the same
                round trip as the lock).
        """
        d = _DATASETS.c
        partitioned = select(_BLOCKS.c.id).where(_BLOCKS.c.dataset_id == d.id).exists().label("partitioned")
        stmt = (select(d.id, d.name, d.unit, d.delta, d.epsilon_cap, d.head_seq, d.head_hash, partitioned, d.accountant,
                       d.filter_spec).where(d.name == name if dataset_id is None else d.id == dataset_id))
        if self._pg:
            stmt = stmt.with_for_update(of=_DATASETS)
            if asynchronous_commit:
                stmt = stmt.add_columns(func.set_config("synchronous_commit", "off", True))
        row = conn.execute(stmt).one_or_none()
        if row is None:
            raise LedgerError(f"dataset {name!r} is not registered in the ledger")
        return _Locked(*row[:10])

    @staticmethod
    def _next_event(ds: _Locked, kind: str, charge_id: Optional[str], payload: dict[str, Any]) -> dict[str, Any]:
        """The next event of the dataset's hash chain, as a row; advances ``ds``'s head to it."""
        seq = ds.head_seq + 1
        created = _now()
        body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        digest = _event_hash(ds.name, seq, kind, charge_id, body, created, ds.head_hash)
        row = {"dataset_id": ds.id, "seq": seq, "charge_id": charge_id, "kind": kind, "payload": body,
               "created_at": created, "prev_hash": ds.head_hash, "hash": digest}
        ds.head_seq, ds.head_hash = seq, digest
        return row

    @classmethod
    def _append(cls, conn: Connection, ds: _Locked, kind: str, charge_id: Optional[str], payload: dict[str, Any]) -> None:
        """Append one event to the dataset's hash chain and move the chain head (caller holds the lock)."""
        cls._write_event(conn, ds, cls._next_event(ds, kind, charge_id, payload))

    @staticmethod
    def _write_event(conn: Connection, ds: _Locked, event_row: dict[str, Any]) -> None:
        """Insert an event made by :meth:`_next_event` and store the chain head it moved ``ds`` to."""
        conn.execute(insert(_EVENTS), event_row)
        conn.execute(update(_DATASETS).where(_DATASETS.c.id == ds.id).values(head_seq=ds.head_seq, head_hash=ds.head_hash))

    @staticmethod
    def _charge_row(conn: Connection, charge_id: str) -> Any:
        """The charge's (dataset_id, steps_planned); LedgerError if there is no such charge."""
        c = ChargeRow.__table__.c
        row = conn.execute(select(c.dataset_id, c.steps_planned).where(c.id == charge_id)).one_or_none()
        if row is None:
            raise LedgerError(f"charge {charge_id!r} does not exist")
        return row

    def _charges(self, session: Session | Connection, ds: Any, charge_id: Optional[str] = None) -> list[Charge]:
        """Charges of ``ds`` (or the one ``charge_id``) with their state replayed from the events.

        This is the authoritative read (the record itself); admission and budgets use the derived
        ``charge_states``/``spend_totals`` instead, and :meth:`verify` checks the two agree.
        """
        # Plain column tuples (no ORM objects): cheap even for long histories.
        c = ChargeRow.__table__.c
        e = _EVENTS.c
        rows_q = (select(c.id, c.noise_multiplier, c.sample_rate, c.steps_planned, c.max_grad_norm, c.unit, c.neighbouring,
                         c.n_records, c.job, c.data_version, c.flow_run_id, c.code_version, c.created_at, c.lease_expires_at,
                         c.spec_hash)
                  .where(c.dataset_id == ds.id).order_by(c.created_at))
        events_q = (select(e.charge_id, e.kind, e.payload)
                    .where(e.dataset_id == ds.id, e.charge_id.is_not(None), e.kind.in_([*TRANSITIONS, MODEL_BOUND]))
                    .order_by(e.seq))
        links_q = (select(ChargeBlockRow.charge_id, BlockRow.name)
                   .join(BlockRow, BlockRow.id == ChargeBlockRow.block_id)
                   .where(BlockRow.dataset_id == ds.id).order_by(BlockRow.name))
        if charge_id is not None:
            rows_q = rows_q.where(c.id == charge_id)
            events_q = events_q.where(e.charge_id == charge_id)
            links_q = links_q.where(ChargeBlockRow.charge_id == charge_id)
        state: dict[str, str] = {}
        steps_run: dict[str, int] = {}
        mlflow_run: dict[str, str] = {}
        for cid, kind, payload in session.execute(events_q):
            if kind == MODEL_BOUND:  # the binding, written once, names the MLflow run
                mlflow_run.setdefault(cid, json.loads(payload)["mlflow_run_id"])
                continue
            state[cid] = kind
            if kind == COMMITTED:
                steps_run[cid] = int(json.loads(payload)["steps_run"])
        links: dict[str, list[str]] = {}
        for cid, block_name in session.execute(links_q):
            links.setdefault(cid, []).append(block_name)
        return [
            Charge(
                blocks=tuple(links.get(r.id, ())),
                id=r.id, dataset=ds.name, state=state.get(r.id, RESERVED),
                mechanism=_mechanism(r.noise_multiplier, r.sample_rate, r.steps_planned),
                steps_run=steps_run.get(r.id), max_grad_norm=r.max_grad_norm, unit=r.unit,
                neighbouring=r.neighbouring, n_records=r.n_records, job=r.job, data_version=r.data_version,
                flow_run_id=r.flow_run_id, code_version=r.code_version, created_at=r.created_at,
                lease_expires_at=r.lease_expires_at, mlflow_run_id=mlflow_run.get(r.id), spec_hash=r.spec_hash,
            )
            for r in session.execute(rows_q)
        ]

    # -- the derived spend index (charge_states, spend_totals): written under the dataset lock

    def _add_steps(self, conn: Connection, ds: _Locked, scopes: list[str], sigma: float, q: float, change: int) -> None:
        """Add ``change`` counted steps of mechanism (sigma, q) to each scope's total (a new total
        stores the one-step curve at the dataset's filter orders)."""
        dataset_id = ds.id
        t = _TOTALS
        for scope in scopes:
            if change > 0:  # one upsert: insert the scope's first total, or add to it
                dialect_insert = pg_insert if self._pg else sqlite_insert
                stmt = dialect_insert(t).values(dataset_id=dataset_id, scope=scope, noise_multiplier=sigma, sample_rate=q,
                                                steps=change, rdp_per_step=_rdp_json(ds.privacy_filter, sigma, q))
                conn.execute(stmt.on_conflict_do_update(
                    index_elements=[t.c.dataset_id, t.c.scope, t.c.noise_multiplier, t.c.sample_rate],
                    set_={"steps": t.c.steps + stmt.excluded.steps},
                ))
                continue
            done = conn.execute(
                update(t)
                .where(t.c.dataset_id == dataset_id, t.c.scope == scope, t.c.noise_multiplier == sigma, t.c.sample_rate == q)
                .values(steps=t.c.steps + change)
            ).rowcount
            if not done:
                raise LedgerError(f"spend index has no total for scope {scope!r}, sigma {sigma}, q {q}; run `dpops ledger verify`")

    def _set_state(self, conn: Connection, ds: _Locked, charge_id: str, new_state: str, payload: dict[str, Any], *,
                   counted: int, was_counted: int) -> None:
        """Append a state event and update the derived index to match (caller holds the lock)."""
        change = counted - was_counted
        if change:
            c = ChargeRow.__table__.c
            sigma, q = conn.execute(select(c.noise_multiplier, c.sample_rate).where(c.id == charge_id)).one()
            scopes = list(conn.scalars(
                select(BlockRow.name).join(ChargeBlockRow, ChargeBlockRow.block_id == BlockRow.id)
                .where(ChargeBlockRow.charge_id == charge_id)
            )) or [WHOLE]
            self._add_steps(conn, ds, scopes, sigma, q, change)
        conn.execute(update(_STATES).where(_STATES.c.charge_id == charge_id).values(state=new_state, steps_counted=counted))
        self._append(conn, ds, new_state, charge_id, payload)

    def _expire_stale(self, conn: Connection, ds: _Locked) -> int:
        """Append ``expired`` for reservations past their lease (caller holds the dataset lock);
        return how many expired."""
        cs = _STATES.c
        stale = conn.execute(
            select(cs.charge_id, cs.steps_counted).where(cs.dataset_id == ds.id, cs.state == RESERVED, cs.lease_expires_at < _now())
        ).all()
        for charge_id, was in stale:
            self._set_state(conn, ds, charge_id, EXPIRED, {"reason": "lease expired before the run started"}, counted=0, was_counted=was)
        return len(stale)

    @staticmethod
    def _scope_rows(conn: Session | Connection, dataset_id: int, block: Optional[str] = None) -> list[Any]:
        """The spend-index rows (sigma, q, steps, stored curve) the dataset's (or ``block``'s) filter
        counts: the charges that read the whole dataset, plus, for a block, those that read it."""
        t = _TOTALS.c
        scopes = [WHOLE, block] if block else [WHOLE]
        return conn.execute(
            select(t.noise_multiplier, t.sample_rate, t.steps, t.rdp_per_step)
            .where(t.dataset_id == dataset_id, t.steps > 0, t.scope.in_(scopes))
        ).all()

    @classmethod
    def _scope_totals(cls, conn: Session | Connection, dataset_id: int, block: Optional[str] = None) -> list[SubsampledGaussian]:
        """What the dataset's (or ``block``'s) filter counts, as mechanisms (see :meth:`_scope_rows`)."""
        return [_mechanism(sigma, q, steps) for sigma, q, steps, _curve in cls._scope_rows(conn, dataset_id, block)]

    @classmethod
    def _scope_rdp(cls, conn: Session | Connection, dataset_id: int, f: filters.PrivacyFilter,
                   block: Optional[str] = None) -> np.ndarray:
        """The filter state of the dataset (or ``block``): its counted RDP at the filter's orders,
        ``sum(steps * RDP_one_step)`` over the same rows as :meth:`_scope_totals`, from the curves
        stored beside them (computed afresh where one is missing).

        Raises:
            LedgerError: a stored curve has another number of orders than the filter (edited).
        """
        total = np.zeros(len(f.orders))
        for sigma, q, steps, curve in cls._scope_rows(conn, dataset_id, block):
            one = np.asarray(json.loads(curve) if curve else f.one_step(sigma, q), dtype=float)
            if one.shape != total.shape:
                raise LedgerError(f"a stored RDP curve has {one.size} orders, the dataset's filter {total.size}; "
                                  "run `dpops ledger verify`")
            total += steps * one
        return total

    def _blocks(self, conn: Session | Connection, dataset_id: int, names: Optional[list[str]] = None,
                lock: bool = False, dataset: str = "") -> list[tuple[int, str, float, int]]:
        """Blocks of the dataset as (id, name, epsilon_cap, n_records), in id order."""
        b = _BLOCKS.c
        stmt = select(b.id, b.name, b.epsilon_cap, b.n_records).where(b.dataset_id == dataset_id)
        if names is not None:
            stmt = stmt.where(b.name.in_(names))
        stmt = stmt.order_by(b.id)  # always lock in the same (sorted) order: no deadlocks
        if lock and self._pg:
            stmt = stmt.with_for_update()
        rows = [tuple(r) for r in conn.execute(stmt)]
        if names is not None:
            missing = sorted(set(names) - {r[1] for r in rows})
            if missing:
                raise LedgerError(f"dataset {dataset!r} has no block(s) {missing}")
        return rows

    # ----------------------------------------------------------------- datasets

    def register_dataset(
        self, *, name: str, unit: str, delta: float, epsilon_cap: float, contribution_bound: Optional[int] = None,
        source: Optional[str] = None, linked_from: Optional[str] = None,
        privacy_filter: filters.PrivacyFilter = filters.GRID_FILTER, filter_from_config: bool = False,
    ) -> None:
        """Register a dataset, or check that the registered one has the same terms.

        ``privacy_filter`` (its orders and delta shares) is fixed here, for the life of the
        dataset, and stored in the ``registered`` event: the pipeline passes the one chosen from
        the registering job's mechanism (:func:`dpops.privacy.filters.choose_filter`) or the config's
        ``privacy.filter_orders``; the default is :data:`dpops.privacy.filters.GRID_FILTER`. For a dataset
        already registered it is ignored, unless ``filter_from_config`` (the config names orders):
        then a different registered filter is refused like a different cap.

        ``source`` (the repo-relative DVC path of the training file) is recorded in the
        ``registered`` event: a budget belongs to the data, not to a name, so a new dataset on a
        source another dataset registered is refused. ``linked_from`` is the name of a config
        that shares ``name``'s budget (its field ``budget_of``): ``name`` must then be registered
        already, on the same source, and nothing new is registered.

        Raises:
            ConfigError: the dataset exists with a different unit, delta or cap (or, with
                ``filter_from_config``, filter). The ledger is the source of truth; a config file
                cannot silently raise a cap.
            LedgerError: the source is another dataset's, or a link names an unregistered dataset
                or one on another source.
        """
        _check_name("name", name)
        if contribution_bound is not None:
            _check_count("contribution_bound", contribution_bound)
        if not (0 < epsilon_cap <= MAX_EPSILON_CAP):  # also refuses nan and inf
            raise ConfigError(f"dataset {name!r}: field 'privacy.epsilon_cap' must be in (0, {MAX_EPSILON_CAP:g}]. "
                              f"Found {epsilon_cap}.")
        if not (0 < delta < 1):  # also refuses nan
            raise ConfigError(f"dataset {name!r}: field 'privacy.delta' must be in (0, 1). Found {delta}.")
        if unit not in ("record", "user"):
            raise ConfigError(f"dataset {name!r}: field 'unit' must be 'record' or 'user'. Found {unit!r}.")
        if unit == "user" and not (contribution_bound and contribution_bound >= 1):
            raise ConfigError(f"dataset {name!r}: unit 'user' needs field 'contribution_bound' >= 1. Found {contribution_bound}.")
        if unit == "record":
            contribution_bound = None
        d = _DATASETS.c
        raced = False
        with self.engine.begin() as conn:
            if self._pg and source is not None:  # one registration at a time: two names cannot claim one source
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_REGISTER_LOCK})")
            row = conn.execute(select(d.unit, d.contribution_bound, d.delta, d.epsilon_cap, d.accountant, d.filter_spec)
                               .where(d.name == name)).one_or_none()
            if source is not None:
                self._check_source(conn, name, source, registered=row is not None, linked_from=linked_from)
            if row is not None:
                differs = [
                    f"{k}: ledger {a!r}, config {b!r}"
                    for k, a, b in (("unit", row.unit, unit), ("contribution_bound", row.contribution_bound, contribution_bound),
                                    ("delta", row.delta, delta), ("epsilon_cap", row.epsilon_cap, epsilon_cap))
                    if a != b
                ]
                if filter_from_config and (row.accountant, row.filter_spec) != (privacy_filter.name, privacy_filter.spec_json()):
                    differs.append(f"privacy.filter_orders: ledger {_describe_filter(row.accountant, row.filter_spec)}, "
                                   f"config {privacy_filter.describe()}")
                if differs:
                    raise ConfigError(
                        f"dataset {name!r} is registered in the ledger with other terms ({'; '.join(differs)}). "
                        "The ledger is the source of truth; a cap is not changed by editing a config."
                    )
                return
            # ON CONFLICT DO NOTHING: a concurrent registration that inserted the same name first wins
            # (PostgreSQL waits for it to commit); this one then compares terms with it, below.
            dialect_insert = pg_insert if self._pg else sqlite_insert
            new_id = conn.scalar(dialect_insert(_DATASETS).values(
                name=name, unit=unit, contribution_bound=contribution_bound, delta=delta, epsilon_cap=epsilon_cap,
                accountant=privacy_filter.name, filter_spec=privacy_filter.spec_json(), created_at=_now(), head_seq=0,
                head_hash=GENESIS,
            ).on_conflict_do_nothing(index_elements=[d.name]).returning(d.id))
            raced = new_id is None
            if not raced:
                ds = _Locked(new_id, name, unit, delta, epsilon_cap, 0, GENESIS, False, privacy_filter.name,
                             privacy_filter.spec_json())
                payload = {"unit": unit, "contribution_bound": contribution_bound, "delta": delta,
                           "epsilon_cap": epsilon_cap, "accountant": privacy_filter.name}
                if privacy_filter.spec() is not None:
                    payload["filter"] = privacy_filter.spec()
                if source is not None:
                    payload["source"] = source
                self._append(conn, ds, "registered", None, payload)
        if raced:  # the winner's row is committed now: same terms are a no-op, others refused
            self.register_dataset(name=name, unit=unit, delta=delta, epsilon_cap=epsilon_cap,
                                  contribution_bound=contribution_bound, source=source, linked_from=linked_from,
                                  privacy_filter=privacy_filter, filter_from_config=filter_from_config)

    @staticmethod
    def _sources(conn: Connection) -> dict[str, Optional[str]]:
        """Each registered dataset's source, from its ``registered`` event (None: registered without one)."""
        e, d = _EVENTS.c, _DATASETS.c
        rows = conn.execute(select(d.name, e.payload).join(_EVENTS, e.dataset_id == d.id).where(e.kind == "registered"))
        out: dict[str, Optional[str]] = {}
        for ds_name, body in rows:
            try:
                out[ds_name] = json.loads(body).get("source")
            except (ValueError, AttributeError):
                out[ds_name] = None
        return out

    def _check_source(self, conn: Connection, name: str, source: str, *, registered: bool,
                      linked_from: Optional[str]) -> None:
        """Refuse a second budget on one source: a new name on a registered source, or a broken link."""
        sources = self._sources(conn)
        if linked_from is not None:
            if not registered:
                raise LedgerError(
                    f"dataset {linked_from!r} has field 'budget_of: {name}', but dataset {name!r} is not registered in "
                    f"the ledger: run a job on {name!r} first, or remove the field. Nothing was charged."
                )
            if sources.get(name) not in (None, source):
                raise LedgerError(
                    f"dataset {linked_from!r} has field 'budget_of: {name}', but its training file {source!r} is not "
                    f"the source dataset {name!r} was registered on: a link shares one source's budget. Nothing was charged."
                )
            return
        if registered:
            return
        others = sorted(n for n, src in sources.items() if src == source and n != name)
        if others:
            raise LedgerError(
                f"dataset {name!r}: its training file {source!r} is the source dataset {others[0]!r} was registered on. "
                f"A budget belongs to the data, not to a name: set field 'budget_of: {others[0]}' in dataset "
                f"{name!r}'s config to charge {others[0]!r}'s budget. Nothing was registered or charged."
            )

    def datasets(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.scalars(select(_DATASETS.c.name).order_by(_DATASETS.c.name)))

    def add_block(self, dataset: str, *, name: str, n_records: int, epsilon_cap: Optional[float] = None) -> None:
        """Append a block (new people's records) to ``dataset``, with its own cap (default: the dataset's).

        Blocks are for new arrivals only: a new version of records already in a block is not a
        new block and brings no new budget.
        """
        if n_records < 1:
            raise ConfigError(f"block {name!r}: n_records must be >= 1. Found {n_records}.")
        if not name.strip():
            raise ConfigError(f"dataset {dataset!r}: a block needs a non-empty name")
        _check_name("block", name)
        _check_count("n_records", n_records)
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset)
            ds.epsilon_cap = self._check_admission(conn, ds).terms.epsilon_cap  # the cap a block is bounded by
            cap = ds.epsilon_cap if epsilon_cap is None else float(epsilon_cap)
            if not 0 < cap <= ds.epsilon_cap:  # NaN fails too
                raise ConfigError(f"dataset {dataset!r} block {name!r}: epsilon_cap must be in (0, {ds.epsilon_cap:g}] "
                                  f"(the dataset's cap; a block never has more). Found {cap}.")
            cs = _STATES.c
            whole = conn.scalar(select(func.count()).select_from(_STATES).where(
                cs.dataset_id == ds.id, cs.state.not_in(sorted(UNCHARGED)),
                ~select(ChargeBlockRow.charge_id).where(ChargeBlockRow.charge_id == cs.charge_id).exists()))
            if whole and not ds.partitioned:
                raise LedgerError(
                    f"dataset {dataset!r}: refused to add block {name!r}: {whole} charge(s) already read the whole "
                    "dataset, so its records are spent as one; partitioning it now would give them fresh budgets. "
                    "A dataset is partitioned before its first charge, or not at all."
                )
            b = _BLOCKS.c
            if conn.execute(select(b.id).where(b.dataset_id == ds.id, b.name == name)).first():
                raise LedgerError(f"dataset {dataset!r} already has a block {name!r}; blocks are append-only")
            conn.execute(insert(_BLOCKS).values(dataset_id=ds.id, name=name, epsilon_cap=cap, n_records=int(n_records), created_at=_now()))
            self._append(conn, ds, "block_added", None, {"block": name, "epsilon_cap": cap, "n_records": int(n_records)})

    def fresh_blocks(self, dataset: str, mechanism: SubsampledGaussian) -> list[str]:
        """Blocks that could still admit ``mechanism`` (oldest first): where a recurring
        fine-tune keeps training once older blocks are exhausted."""
        with self.engine.connect() as conn:
            ds = self._dataset(conn, dataset)
            f = _filter(ds.accountant, ds.filter_spec)
            return [
                name for _id, name, cap, _n in self._blocks(conn, ds.id)
                if _epsilon(f, self._scope_rdp(conn, ds.id, f, name), mechanism, ds.delta) <= cap
            ]

    def filter_of(self, dataset: str) -> Optional[filters.PrivacyFilter]:
        """The privacy filter ``dataset`` was registered with; None when it is not registered."""
        with self.engine.connect() as conn:
            d = _DATASETS.c
            row = conn.execute(select(d.accountant, d.filter_spec).where(d.name == dataset)).one_or_none()
        return None if row is None else _filter(row.accountant, row.filter_spec)

    # ----------------------------------------------------------------- admission checks the record

    def _check_admission(self, conn: Connection, ds: _Locked) -> _Chain:
        """Check, under the dataset's lock, that what admission reads agrees with the record; return
        the chain's replay, whose terms admission then uses.

        Admission reads derived rows: the dataset's and blocks' terms and the spend index
        (``charge_states``, ``spend_totals``). An edit to them would let a charge in on a cap
        higher, or a spend lower, than the record's. So the dataset's chain is replayed (only the
        events appended since this process last verified it, see ``self._verified``) and compared
        with those rows by verify's own per-dataset checks. Anything wrong refuses the admission;
        so does a dataset registered with a privacy filter this code does not implement.

        Raises:
            LedgerError: the dataset does not verify (``dpops ledger verify`` says why).
        """
        d = _DATASETS.c
        row = conn.execute(select(d.id, d.name, d.unit, d.contribution_bound, d.delta, d.epsilon_cap, d.accountant,
                                  d.filter_spec, d.head_seq, d.head_hash).where(d.id == ds.id)).one()
        problems: list[str] = []
        cached = self._verified.pop(ds.id, None)  # popped: a replay that fails half-way leaves nothing cached
        resume = cached if cached is not None and cached[0] <= row.head_seq else None
        chain = self._replay_chain(conn, row, problems, resume)
        terms = [(row.accountant, row.filter_spec)] + ([(chain.terms.accountant, chain.terms.filter_spec)] if chain.terms else [])
        for accountant, spec in terms:
            try:
                _filter(accountant, spec)
            except LedgerError as exc:
                raise LedgerError(f"dataset {ds.name!r} is accounted by {exc}; refused to admit. Use the dpops version "
                                  "that registered it.") from None
        cs = _STATES.c
        index = {r.charge_id: r for r in conn.execute(
            select(cs.charge_id, cs.dataset_id, cs.state, cs.steps_counted, cs.lease_expires_at).where(cs.dataset_id == ds.id))}
        problems.extend(self._verify_terms(conn, row, chain))
        problems.extend(self._verify_charge_rows(conn, row, chain))
        problems.extend(self._verify_spend_index(conn, row, chain, index, []))
        problems.extend(f"dataset {ds.name!r}: charge {cid} has a state index row but no reserved event (edited)"
                        for cid in index)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise LedgerError(f"ledger {ds.name!r} does not verify: {problems[0]}{more}; refused to admit. "
                              "Run `dpops ledger verify`.")
        self._verified[ds.id] = (row.head_seq, row.head_hash, chain)
        return chain

    # ----------------------------------------------------------------- charges

    def reserve(
        self,
        *,
        dataset: str,
        mechanism: SubsampledGaussian,
        max_grad_norm: float,
        n_records: int,
        job: str,
        data_version: str,
        flow_run_id: Optional[str] = None,
        code_version: Optional[str] = None,
        blocks: Optional[list[str]] = None,
        user_blocks: Optional[dict[str, str]] = None,
        spec_hash: Optional[str] = None,
    ) -> Charge:
        """Admit ``mechanism`` on ``dataset`` if the privacy filter still holds with it.

        One write transaction holding the dataset's lock (and, for a partitioned dataset, the
        rows of the blocks read, in sorted order): read the spend index, check, append.

        Args:
            blocks: for a dataset partitioned into blocks, the blocks this run reads; each must
                admit the charge. ``n_records`` is then the size of their union.
            spec_hash: the digest of the run's configs (``sha256:<64 hex>``, see
                :class:`dpops.config.spec.RunSpec`), kept on the charge so that training refuses
                configs edited after the reservation.

        Raises:
            BudgetExceededError: the charge would take the dataset (or a block) past its cap.
                Nothing is written.
            ConfigError: delta is not below 1/n for this data version, or a field does not fit its
                ledger column (names up to 200 characters, counts up to 2^31 - 1).
            LedgerError: a user of ``user_blocks`` (keyed user id -> block read, unit 'user') is
                mapped to another block; else the new users are mapped, in this transaction.
        """
        _check_count("n_records", n_records)
        _check_count("dp.steps", mechanism.steps)
        for what, value, limit in (("job", job, MAX_NAME), ("data_version", data_version, MAX_NAME),
                                   ("flow_run_id", flow_run_id, MAX_ID), ("code_version", code_version, MAX_ID)):
            _check_name(what, value, limit, optional=what in ("flow_run_id", "code_version"))
        if spec_hash is not None and not _SPEC_HASH.fullmatch(spec_hash):
            raise ConfigError("field 'spec_hash' must be 'sha256:' and 64 lower-case hex digits")
        if not (0 < max_grad_norm < float("inf")):  # also refuses nan
            raise ConfigError(f"field 'dp.max_grad_norm' must be a positive finite number. Found {max_grad_norm}.")
        with self.engine.begin() as conn:
            # On PostgreSQL the reservation commits asynchronously: durability is owed before data
            # is read, and `start` commits synchronously, which flushes the WAL up to and including
            # this reservation. If the server crashed first, the reservation is lost whole and
            # `start` refuses: nothing is read uncharged. Not waiting for the flush keeps the lock short.
            ds = self._lock_dataset(conn, dataset, asynchronous_commit=True)
            chain = self._check_admission(conn, ds)  # the terms below are the chain's (the rows agree)
            ds.delta, ds.epsilon_cap = chain.terms.delta, chain.terms.epsilon_cap
            if not (ds.delta < 1.0 / n_records):
                raise ConfigError(
                    f"dataset {dataset!r}: delta {ds.delta} must be below 1/n = {1.0 / n_records:.3g} (n = {n_records} records)"
                )
            if ds.partitioned and not blocks:
                raise ConfigError(f"dataset {dataset!r} is partitioned into blocks: name the blocks this run reads")
            if blocks and not ds.partitioned:
                raise ConfigError(f"dataset {dataset!r} has no blocks; reserve without naming any")
            block_rows = self._blocks(conn, ds.id, sorted(set(blocks)), lock=True, dataset=dataset) if blocks else []
            block_rows = [(i, name, chain.blocks[name].epsilon_cap, n) for i, name, _cap, n in block_rows]
            for block, cap in [(name, cap) for _id, name, cap, _n in block_rows] or [(None, ds.epsilon_cap)]:
                f = ds.privacy_filter  # the row's, which the replay just compared with the registered event
                base = self._scope_rdp(conn, ds.id, f, block)
                after = _epsilon(f, base, mechanism, ds.delta)
                if after > cap and self._expire_stale(conn, ds):
                    # Stale reservations are expired lazily, when they stand in the way.
                    base = self._scope_rdp(conn, ds.id, f, block)
                    after = _epsilon(f, base, mechanism, ds.delta)
                if after > cap:
                    spent = _epsilon(f, base, None, ds.delta)
                    requested = accounting.epsilon([mechanism], delta=ds.delta)
                    where = f"dataset {dataset!r}" + (f" block {block!r}" if block else "")
                    raise BudgetExceededError(
                        f"{where}: refused. spent {spent:.3f} of cap {cap:g}; this run requests "
                        f"epsilon {requested:.3f}, which would bring the cumulative epsilon to {after:.3f} > cap "
                        f"{cap:g}. Nothing was trained."
                    )
            self._check_data_version(conn, ds.id, dataset, data_version)
            if user_blocks:
                self._claim_user_blocks(conn, ds.id, dataset, user_blocks)
            created = _now()
            charge = Charge(
                id=str(uuid.uuid4()), dataset=ds.name, state=RESERVED, mechanism=mechanism, steps_run=None,
                max_grad_norm=float(max_grad_norm), unit=ds.unit, neighbouring=ADD_REMOVE, n_records=int(n_records),
                job=job, data_version=data_version, flow_run_id=flow_run_id, code_version=code_version,
                created_at=created, lease_expires_at=_now(offset_seconds=self.lease_seconds),
                blocks=tuple(name for _id, name, _cap, _n in block_rows), spec_hash=spec_hash,
            )
            self._write_reservation(conn, ds, charge, [b[0] for b in block_rows])
            return charge

    def _write_reservation(self, conn: Connection, ds: _Locked, charge: Charge, block_ids: list[int]) -> None:
        """Write an admitted charge: its row, block links, state, spend totals and `reserved` event.

        On PostgreSQL this is one statement (writable CTEs; the foreign keys are checked at its
        end), so the dataset's lock is held for three round trips in all: lock, read totals, write.
        On SQLite, in-process, the same rows are written one statement at a time.
        """
        fields = _charge_fields(charge)
        steps = int(charge.mechanism.steps)
        scopes = list(charge.blocks) or [WHOLE]
        event_row = self._next_event(ds, RESERVED, charge.id, {**fields, "blocks": list(charge.blocks)})
        if not self._pg:
            conn.execute(insert(ChargeRow.__table__), {"id": charge.id, "dataset_id": ds.id, **fields})
            if block_ids:
                conn.execute(insert(ChargeBlockRow.__table__), [{"charge_id": charge.id, "block_id": b} for b in block_ids])
            conn.execute(insert(_STATES), {"charge_id": charge.id, "dataset_id": ds.id, "state": RESERVED,
                                           "steps_counted": steps, "lease_expires_at": charge.lease_expires_at})
            self._add_steps(conn, ds, scopes, fields["noise_multiplier"], fields["sample_rate"], steps)
            self._write_event(conn, ds, event_row)
            return
        params: dict[str, Any] = {"charge_id": charge.id, "dataset_id": ds.id, "state": RESERVED, "steps": steps,
                                  **fields, **{f"ev_{k}": v for k, v in event_row.items()}}
        links = ", ".join(f"(:charge_id, :block_{i})" for i in range(len(block_ids)))
        params.update({f"block_{i}": b for i, b in enumerate(block_ids)})
        totals = ", ".join(f"(:dataset_id, :scope_{i}, :noise_multiplier, :sample_rate, :steps, :rdp_per_step)" for i in range(len(scopes)))
        params["rdp_per_step"] = _rdp_json(ds.privacy_filter, fields["noise_multiplier"], fields["sample_rate"])
        params.update({f"scope_{i}": scope for i, scope in enumerate(scopes)})
        columns = ", ".join(CHARGE_FIELDS)
        values = ", ".join(f":{name}" for name in CHARGE_FIELDS)
        conn.execute(text(
            f"WITH c AS (INSERT INTO charges (id, dataset_id, {columns}) VALUES (:charge_id, :dataset_id, {values})), "
            + (f"b AS (INSERT INTO charge_blocks (charge_id, block_id) VALUES {links}), " if block_ids else "")
            + "s AS (INSERT INTO charge_states (charge_id, dataset_id, state, steps_counted, lease_expires_at) "
            "VALUES (:charge_id, :dataset_id, :state, :steps, :lease_expires_at)), "
            f"t AS (INSERT INTO spend_totals (dataset_id, scope, noise_multiplier, sample_rate, steps, rdp_per_step) VALUES {totals} "
            "ON CONFLICT (dataset_id, scope, noise_multiplier, sample_rate) DO UPDATE SET steps = spend_totals.steps + excluded.steps), "
            "e AS (INSERT INTO events (dataset_id, seq, charge_id, kind, payload, created_at, prev_hash, hash) "
            "VALUES (:ev_dataset_id, :ev_seq, :ev_charge_id, :ev_kind, :ev_payload, :ev_created_at, :ev_prev_hash, :ev_hash)) "
            "UPDATE datasets SET head_seq = :ev_seq, head_hash = :ev_hash WHERE id = :dataset_id"
        ), params)

    @staticmethod
    def _mapped_blocks(conn: Session | Connection, dataset_id: int, keys: list[str]) -> dict[str, str]:
        """The block each of ``keys`` (keyed user ids) is mapped to, for those mapped."""
        u = _USER_BLOCKS.c
        out: dict[str, str] = {}
        for i in range(0, len(keys), 500):
            rows = conn.execute(select(u.user_key, u.block).where(u.dataset_id == dataset_id, u.user_key.in_(keys[i:i + 500])))
            out.update({k: b for k, b in rows})
        return out

    @classmethod
    def _check_user_blocks(cls, conn: Session | Connection, dataset_id: int, dataset: str,
                           user_blocks: dict[str, str]) -> list[str]:
        """Refuse users already mapped to another block; return the keys not yet mapped.

        The message names the blocks and how many users, never a user (nor their keyed id)."""
        mapped = cls._mapped_blocks(conn, dataset_id, sorted(user_blocks))
        moved: dict[tuple[str, str], int] = {}
        for key, block in mapped.items():
            if block != user_blocks[key]:
                moved[(block, user_blocks[key])] = moved.get((block, user_blocks[key]), 0) + 1
        if moved:
            which = "; ".join(f"{n} user(s) of block {old!r} now in block {new!r}" for (old, new), n in sorted(moved.items()))
            raise LedgerError(
                f"dataset {dataset!r}: refused. {which}: a user counted in one block is never counted in another, "
                "in any data version (blocks compose in parallel only over disjoint users). Nothing was charged."
            )
        return [k for k in user_blocks if k not in mapped]

    def _claim_user_blocks(self, conn: Connection, dataset_id: int, dataset: str, user_blocks: dict[str, str]) -> None:
        new = self._check_user_blocks(conn, dataset_id, dataset, user_blocks)
        if new:
            conn.execute(insert(_USER_BLOCKS), [{"dataset_id": dataset_id, "user_key": k, "block": user_blocks[k]} for k in new])

    def _check_data_version(self, conn: Connection, dataset_id: int, dataset: str, data_version: str) -> None:
        """Refuse a data version another dataset's budget has charged: a budget belongs to the data.

        Only keyed fingerprints (``hmac-sha256:...``, :func:`dpops.data.source.fingerprint`) name data;
        the same bytes under another path or another name are the same records. A dataset linked
        with ``budget_of`` charges the first dataset, so it never meets this refusal. On PostgreSQL
        a transaction lock on the version serialises two datasets reserving it at once (SQLite's
        ``BEGIN IMMEDIATE`` already does).
        """
        if not data_version.startswith("hmac-sha256:"):
            return
        if self._pg:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k, hashtext(:v))"), {"k": _PG_DATA_VERSION_LOCK, "v": data_version})
        c, d = _CHARGES.c, _DATASETS.c
        other = conn.scalar(select(d.name).join(_CHARGES, c.dataset_id == d.id)
                            .where(c.data_version == data_version, c.dataset_id != dataset_id).order_by(d.name).limit(1))
        if other is not None:
            raise LedgerError(
                f"dataset {dataset!r}: this data version (its keyed fingerprint) is already charged to dataset {other!r}'s "
                f"budget. A budget belongs to the data, not to a name: set field 'budget_of: {other}' in dataset "
                f"{dataset!r}'s config to charge {other!r}'s budget. Nothing was charged."
            )

    def check_user_blocks(self, dataset: str, user_blocks: dict[str, str]) -> None:
        """Read-only: refuse (LedgerError) a user mapped to another block, for plan, before any
        charge; :meth:`reserve` checks again under the lock. A dataset not registered maps no one."""
        with self.engine.connect() as conn:
            row = conn.execute(select(_DATASETS.c.id).where(_DATASETS.c.name == dataset)).one_or_none()
            if row is not None:
                self._check_user_blocks(conn, row.id, dataset, user_blocks)

    def _transition(self, charge_id: str, new_state: str, payload: dict[str, Any], *, counted: Optional[int] = None,
                    check: Optional[Callable[[Connection, int], None]] = None) -> Charge:
        """Move a charge to ``new_state``; ``counted`` is the steps it counts afterwards
        (default: unchanged). ``check(conn, steps_planned)``, if given, runs under the dataset's
        lock once the move is known to be allowed, and may refuse it by raising."""
        with self.engine.begin() as conn:
            dataset_id, planned = self._charge_row(conn, charge_id)
            ds = self._lock_dataset(conn, dataset_id=dataset_id)
            self._expire_stale(conn, ds)
            cs = _STATES.c
            state, was, lease = conn.execute(
                select(cs.state, cs.steps_counted, cs.lease_expires_at).where(cs.charge_id == charge_id)).one()
            if state == EXPIRED and new_state == RUNNING:
                expired_at = lease  # commit the expiry event, then refuse below
            elif new_state not in TRANSITIONS[state]:
                raise LedgerError(
                    f"charge {charge_id}: cannot go from {state!r} to {new_state!r}"
                    + (" (data was read: the spend is real and is never released)" if new_state == RELEASED else "")
                )
            else:
                expired_at = None
                if check is not None:
                    check(conn, planned)
                self._set_state(conn, ds, charge_id, new_state, payload,
                                counted=was if counted is None else counted, was_counted=was)
        if expired_at:
            raise LedgerError(f"charge {charge_id}: the reservation expired at {expired_at}; plan and reserve again")
        if new_state in ANCHORED:
            self._anchor(ds, new_state)
        return self.charge(charge_id)

    def start(self, charge_id: str) -> Charge:
        """Mark a charge ``running``. Call this, durably, before the first private record is read."""
        return self._transition(charge_id, RUNNING, {})

    def commit(self, charge_id: str, *, steps_run: int) -> Charge:
        """Settle a running charge at the steps actually run.

        At the steps reserved, always (the charge counts in full). Below them only at exactly the
        steps of the trainer's own completed result (its ``finished`` event, see
        :meth:`record_finished`): a run that died has none, and whoever settles it cannot claim
        it ran fewer steps than it did. Never below the last ``progress`` (which bounds the steps
        taken from above). Every check reads the events under the dataset's lock, in the
        transaction that commits, so a progress event written concurrently cannot slip in between.
        """
        def check(conn: Connection, planned: int) -> None:
            if not (0 <= steps_run <= planned):
                raise LedgerError(f"charge {charge_id}: steps_run must be in [0, {planned}] (the reserved steps). Found {steps_run}.")
            done = self._last_progress(conn, charge_id)
            if steps_run < done:
                raise LedgerError(f"charge {charge_id}: steps_run {steps_run} is below the {done} steps its progress events record")
            finished = self._finished(conn, charge_id)
            if steps_run < planned and finished != steps_run:
                raise LedgerError(
                    f"charge {charge_id}: steps_run {steps_run} is below the {planned} reserved steps, which is accepted only "
                    "at the steps of the trainer's completed result; "
                    + ("it recorded none (the run did not finish)" if finished is None else f"it ran {finished}")
                )

        return self._transition(charge_id, COMMITTED, {"steps_run": int(steps_run)}, counted=int(steps_run), check=check)

    def record_progress(self, charge_id: str, *, steps_done: int) -> None:
        """Append a durable ``progress`` event: a running charge may take up to ``steps_done`` noisy steps.

        The trainer records it *before* the steps it announces (:func:`dpops.pipeline.stages.progress_recorder`),
        so the last progress is never below the steps actually taken, wherever the run dies; a
        commit is never below it. It changes no figure: a running charge counts its reserved
        steps, and one that dies stays charged at that size. ``steps_done`` must not go back and
        must not pass the steps reserved; none is recorded once the trainer has finished.
        """
        self._append_steps(charge_id, PROGRESS, "steps_done", steps_done, what="progress")

    def record_finished(self, charge_id: str, *, steps_run: int) -> None:
        """Append the trainer's completed result: a running charge's training returned after ``steps_run`` steps.

        Written once, by the stage that ran the trainer, only when it returned (a run that dies
        writes none); :meth:`commit` accepts fewer steps than reserved only at exactly these.
        ``steps_run`` must be in [last progress, reserved].
        """
        self._append_steps(charge_id, FINISHED, "steps_run", steps_run, what="a finished result")

    def _append_steps(self, charge_id: str, kind: str, field: str, steps: int, *, what: str) -> None:
        """Append a ``progress`` or ``finished`` event of a running charge, under its dataset's lock:
        ``steps`` (the payload's ``field``) must be in [last progress, reserved]."""
        with self.engine.begin() as conn:
            ds, planned = self._lock_running(conn, charge_id, what)
            last = self._last_progress(conn, charge_id)
            if not (last <= steps <= planned):
                raise LedgerError(f"charge {charge_id}: {field} must be in [{last}, {planned}] (last progress, reserved). "
                                  f"Found {steps}.")
            self._append(conn, ds, kind, charge_id, {field: int(steps)})

    def _lock_running(self, conn: Connection, charge_id: str, what: str) -> tuple[_Locked, int]:
        """Lock the charge's dataset; refuse unless the charge is running and its trainer has not
        finished. Returns the locked dataset and the charge's reserved steps."""
        dataset_id, planned = self._charge_row(conn, charge_id)
        ds = self._lock_dataset(conn, dataset_id=dataset_id)
        state = conn.scalar(select(_STATES.c.state).where(_STATES.c.charge_id == charge_id))
        if state != RUNNING:
            raise LedgerError(f"charge {charge_id}: {what} is recorded only while running; it is {state!r}")
        if self._finished(conn, charge_id) is not None:
            raise LedgerError(f"charge {charge_id}: its trainer has already finished")
        return ds, planned

    @staticmethod
    def _last_progress(conn: Connection, charge_id: str) -> int:
        e = _EVENTS.c
        payload = conn.scalar(select(e.payload).where(e.charge_id == charge_id, e.kind == PROGRESS)
                              .order_by(e.seq.desc()).limit(1))
        return int(json.loads(payload)["steps_done"]) if payload else 0

    @staticmethod
    def _finished(conn: Connection, charge_id: str) -> Optional[int]:
        """The steps of the charge's ``finished`` event; None when it has none."""
        e = _EVENTS.c
        payload = conn.scalar(select(e.payload).where(e.charge_id == charge_id, e.kind == FINISHED).limit(1))
        return int(json.loads(payload)["steps_run"]) if payload else None

    def progress(self, charge_id: str) -> int:
        """The last steps_done recorded for a charge (0 when none)."""
        with self.engine.connect() as conn:
            return self._last_progress(conn, charge_id)

    def fail(self, charge_id: str, *, reason: str) -> Charge:
        """A running charge whose run died: it stays charged at its reserved size."""
        return self._transition(charge_id, FAILED_CHARGED, {"reason": reason})

    def release(self, charge_id: str, *, reason: str) -> Charge:
        """Release a reservation that never read data. Refused once the charge is running."""
        if not reason.strip():
            raise LedgerError("a release needs a reason")
        return self._transition(charge_id, RELEASED, {"reason": reason}, counted=0)

    def annotate(self, charge_id: str, **fields: Any) -> None:
        """Append free-form lineage learnt later as an ``annotated`` event; the charge row stays as written.

        The gate reads nothing from these notes. The keys the model binding and the gate's evidence
        own (:data:`GATE_KEYS`) are refused: they are written once, by :meth:`bind_model` and
        :meth:`record_evidence`, so that a later note cannot re-point a charge at another model
        or rewrite its accuracy.
        """
        owned = sorted(GATE_KEYS & set(fields))
        if owned:
            raise LedgerError(f"charge {charge_id}: annotate cannot write {owned}: the model binding and the gate's evidence "
                              "are written once, by bind_model and record_evidence")
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            self._append(conn, ds, "annotated", charge_id, fields)

    def bind_model(self, charge_id: str, *, model_name: str, model_version: str | int, mlflow_run_id: str,
                   artifact_sha256: str) -> None:
        """Bind the model version a charge trained to it: a ``model_bound`` event, written once.

        ``artifact_sha256`` is the SHA-256 of the version's weight file (``trainable.safetensors``,
        the DP output; its hash is post-processing): serving compares it with the weights it loads.
        Written under the dataset's lock; a second binding of the charge is refused, and so is a
        binding of a model version already bound to any charge of any dataset (one charge per
        version; on PostgreSQL an advisory lock serialises bindings across datasets, on SQLite the
        write lock is database-wide).

        Raises:
            LedgerError: a field is malformed, the charge is already bound, or the version is.
        """
        version = str(model_version).strip()
        if not (isinstance(model_name, str) and model_name.strip() and len(model_name) <= 200):
            raise LedgerError(f"charge {charge_id}: field 'model_name' must be a non-empty name of at most 200 characters")
        if not version.isdigit():
            raise LedgerError(f"charge {charge_id}: field 'model_version' must be an MLflow version number. Found {version!r:.40}.")
        if not (isinstance(mlflow_run_id, str) and mlflow_run_id.strip() and len(mlflow_run_id) <= 100):
            raise LedgerError(f"charge {charge_id}: field 'mlflow_run_id' must be a non-empty id of at most 100 characters")
        if not (isinstance(artifact_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", artifact_sha256)):
            raise LedgerError(f"charge {charge_id}: field 'artifact_sha256' must be 64 lowercase hex digits")
        binding = {"model_name": model_name, "model_version": str(int(version)), "mlflow_run_id": mlflow_run_id,
                   "artifact_sha256": artifact_sha256}
        with self.engine.begin() as conn:
            if self._pg:  # before the dataset's lock, always in this order: no deadlock
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_BINDING_LOCK})")
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            for bound_charge, _dataset, payload in self._bindings(conn):
                if bound_charge == charge_id:
                    raise LedgerError(f"charge {charge_id} is already bound to model {payload['model_name']}/"
                                      f"{payload['model_version']}; a binding is written once")
                if (payload["model_name"], payload["model_version"]) == (model_name, binding["model_version"]):
                    raise LedgerError(f"model {model_name}/{binding['model_version']} is already bound to charge {bound_charge}; "
                                      "a model version is bound to one charge")
            self._append(conn, ds, MODEL_BOUND, charge_id, binding)

    def record_evidence(self, charge_id: str, *, task: str, figures: dict[str, float], audit: dict[str, Any]) -> ChainHead:
        """Record the gate's evidence on a bound charge: an ``evidence`` event, written once.

        ``figures`` are the utility figures of the eval split (:data:`EVIDENCE_FIGURES`), ``audit``
        the audit's verdict and figures (canaries only). Written under the dataset's lock, after
        the model binding; a second record is refused. Returns the chain head after it (anchored).

        Raises:
            LedgerError: a field is malformed, the charge has no binding, or its evidence is recorded.
        """
        if not (isinstance(task, str) and task.strip() and len(task) <= 100):
            raise LedgerError(f"charge {charge_id}: field 'task' must be a non-empty name of at most 100 characters")
        unknown = sorted(set(figures) - set(EVIDENCE_FIGURES))
        if unknown:
            raise LedgerError(f"charge {charge_id}: evidence figures {unknown} are not among {list(EVIDENCE_FIGURES)}")
        for name, value in figures.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise LedgerError(f"charge {charge_id}: evidence figure {name!r} must be a number")
        if not (isinstance(audit, dict) and isinstance(audit.get("verdict"), str)):
            raise LedgerError(f"charge {charge_id}: field 'audit' must be the audit's figures with a 'verdict'")
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset_id=self._charge_row(conn, charge_id).dataset_id)
            if not self._charge_payloads(conn, charge_id, MODEL_BOUND):
                raise LedgerError(f"charge {charge_id} is bound to no model: bind_model comes before its evidence")
            if self._charge_payloads(conn, charge_id, EVIDENCE):
                raise LedgerError(f"charge {charge_id}: its evidence is already recorded; evidence is written once")
            self._append(conn, ds, EVIDENCE, charge_id,
                         {"task": task, **{k: float(v) for k, v in figures.items()}, "audit": audit})
        return self._anchor(ds, EVIDENCE)

    @staticmethod
    def _charge_payloads(conn: Connection, charge_id: str, kind: str) -> list[dict[str, Any]]:
        e = _EVENTS.c
        return [json.loads(p) for p in conn.scalars(
            select(e.payload).where(e.charge_id == charge_id, e.kind == kind).order_by(e.seq))]

    @staticmethod
    def _bindings(conn: Connection) -> list[tuple[str, str, dict[str, Any]]]:
        """Every ``model_bound`` event of the ledger, as (charge id, dataset, payload), in chain order."""
        e, d = _EVENTS.c, _DATASETS.c
        rows = conn.execute(select(e.charge_id, d.name, e.payload).join(_DATASETS, d.id == e.dataset_id)
                            .where(e.kind == MODEL_BOUND).order_by(d.name, e.seq))
        return [(cid, name, json.loads(payload)) for cid, name, payload in rows]

    def charge_records(self, charge_id: str, kind: str) -> list[dict[str, Any]]:
        """The payloads of a charge's events of ``kind`` (e.g. :data:`MODEL_BOUND`, :data:`EVIDENCE`), in chain order."""
        with self.engine.connect() as conn:
            self._charge_row(conn, charge_id)
            return self._charge_payloads(conn, charge_id, kind)

    def evidence_of(self, dataset: str) -> list[tuple[str, dict[str, Any]]]:
        """Every ``evidence`` event of ``dataset``, as (charge id, payload), in chain order: the
        past runs' audits, for pooling them (:func:`dpops.pooling.dataset_pool`). Read from the
        hash-chained events (the record), not the annotations; LedgerError if ``dataset`` is unknown."""
        e = _EVENTS.c
        with self.engine.connect() as conn:
            ds = self._dataset(conn, dataset)
            rows = conn.execute(select(e.charge_id, e.payload).where(e.dataset_id == ds.id, e.kind == EVIDENCE).order_by(e.seq))
            return [(cid, json.loads(payload)) for cid, payload in rows]

    def bindings_of(self, model_name: str, model_version: str | int) -> list[tuple[str, str, dict[str, Any]]]:
        """The (charge id, dataset, binding) of every charge bound to this model version, across
        the ledger: one for a version a dpops run recorded, none for any other."""
        version = str(model_version)
        with self.engine.connect() as conn:
            return [b for b in self._bindings(conn) if (b[2]["model_name"], b[2]["model_version"]) == (model_name, version)]

    def gate_decisions(self, model: str) -> list[dict[str, Any]]:
        """Every ``gate_decision`` for ``model`` (``"name/version"``) across datasets, oldest first
        (by time, then dataset and seq), each as {dataset, seq, at, charge, payload}."""
        e, d = _EVENTS.c, _DATASETS.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(d.name, e.seq, e.created_at, e.charge_id, e.payload)
                                .join(_DATASETS, d.id == e.dataset_id).where(e.kind == "gate_decision"))
            found = [{"dataset": name, "seq": seq, "at": at, "charge": cid, "payload": json.loads(payload)}
                     for name, seq, at, cid, payload in rows]
        return sorted((f for f in found if f["payload"].get("model") == model), key=lambda f: (f["at"], f["dataset"], f["seq"]))

    def record_decision(self, dataset: str, *, decision: dict[str, Any]) -> ChainHead:
        """Append a gate decision to the dataset's chain; return the chain head after it (anchored)."""
        with self.engine.begin() as conn:
            ds = self._lock_dataset(conn, dataset)
            self._append(conn, ds, "gate_decision", decision.get("charge_id"), decision)
        return self._anchor(ds, "gate_decision")

    # ----------------------------------------------------------------- reads

    @staticmethod
    def _dataset(conn: Session | Connection, name: str) -> Any:
        """The dataset's row (id, name, unit, delta, epsilon_cap), unlocked; LedgerError if unknown."""
        d = _DATASETS.c
        row = conn.execute(select(d.id, d.name, d.unit, d.delta, d.epsilon_cap, d.accountant, d.filter_spec)
                           .where(d.name == name)).one_or_none()
        if row is None:
            raise LedgerError(f"dataset {name!r} is not registered in the ledger")
        return row

    def charge(self, charge_id: str) -> Charge:
        with self.engine.connect() as conn:
            d = _DATASETS.c
            ds = conn.execute(select(d.id, d.name).where(d.id == self._charge_row(conn, charge_id).dataset_id)).one()
            return self._charges(conn, ds, charge_id)[0]

    def charges(self, dataset: str) -> list[Charge]:
        """Every charge of ``dataset``, its state replayed from the hash-chained events (the record)."""
        with self.engine.connect() as conn:
            return self._charges(conn, self._dataset(conn, dataset))

    def budget(self, dataset: str, *, estimate: bool = False) -> DatasetBudget:
        """Cap, spent (the filter's guaranteed epsilon) and charge counts of ``dataset``.

        The figures are computed from the spend index, the per-mechanism step totals that
        admission itself checks against (RDP is linear in steps, so this is exact, not a sum of
        epsilons). :meth:`verify` recomputes that index from the charges and the events and
        reports any difference as an edit.

        Args:
            estimate: also compute the tight PLD estimate (slower; for reports, not admission).
        """
        with self.engine.connect() as conn:
            ds = self._dataset(conn, dataset)
            cs = _STATES.c
            counts = {state: int(n) for state, n in conn.execute(
                select(cs.state, func.count()).where(cs.dataset_id == ds.id).group_by(cs.state).order_by(cs.state))}
            blocks = self._blocks(conn, ds.id)
            names = [name for _id, name, _cap, _n in blocks] or [None]
            f = _filter(ds.accountant, ds.filter_spec)
            state = {name or WHOLE: self._scope_rdp(conn, ds.id, f, name) for name in names}
            spent = {name: _epsilon(f, rdp, None, ds.delta) for name, rdp in state.items()}
            c = _CHARGES.c
            last = conn.execute(select(c.noise_multiplier, c.sample_rate, c.steps_planned).where(c.dataset_id == ds.id)
                                .order_by(c.created_at.desc(), c.id.desc()).limit(1)).one_or_none()
            mechanism = _mechanism(*last) if last is not None else None
            caps = {name: cap for _id, name, cap, _n in blocks} or {WHOLE: ds.epsilon_cap}
            left = {}
            if mechanism is not None:
                t = _TOTALS.c
                stored = conn.scalar(select(t.rdp_per_step).where(  # its curve, stored with its totals
                    t.dataset_id == ds.id, t.noise_multiplier == last.noise_multiplier, t.sample_rate == last.sample_rate).limit(1))
                one = json.loads(stored) if stored else None
                one = one if one is not None and len(one) == len(f.orders) else None
                left = {name: f.runs_left(rdp, mechanism, delta=ds.delta, cap=caps[name], one_step=one) for name, rdp in state.items()}
            pld = None
            if estimate:  # a block's charges compose; disjoint blocks compose in parallel
                scopes = [self._scope_totals(conn, ds.id, name) for name in names]
                pld = max((accounting.pld_epsilon(m, delta=ds.delta) if m else 0.0) for m in scopes)
        block_budgets = [BlockBudget(name, cap, n, spent[name], left.get(name)) for _id, name, cap, n in blocks]
        extra = {"privacy_filter": f, "last_mechanism": mechanism, "runs_left": max(left.values()) if left else None}
        if block_budgets:
            return DatasetBudget(ds.name, ds.unit, ds.delta, max(b.epsilon_cap for b in block_budgets),
                                 max(b.spent for b in block_budgets), counts, pld, block_budgets, **extra)
        return DatasetBudget(ds.name, ds.unit, ds.delta, ds.epsilon_cap, spent[WHOLE], counts, pld, [], **extra)

    def counted(self, dataset: str, block: Optional[str] = None) -> list[SubsampledGaussian]:
        """What the dataset's (or one block's) filter counts now, as admission sees it; empty
        for a dataset not yet registered. For planning; admission re-checks under the lock."""
        with self.engine.connect() as conn:
            try:
                ds = self._dataset(conn, dataset)
            except LedgerError:
                return []
            return self._scope_totals(conn, ds.id, block)

    def budgets(self, *, estimate: bool = False) -> list[DatasetBudget]:
        return [self.budget(name, estimate=estimate) for name in self.datasets()]

    def verify(self) -> list[str]:
        """Everything :meth:`verify_report` finds wrong (edits, deletions, tampering); empty when the
        ledger verifies. Numerical drift of a stored curve is not in it (see :class:`VerifyReport`)."""
        return list(self.verify_report().problems)

    def verify_report(self) -> VerifyReport:
        """Recompute the ledger from its hash-chained events and compare every other row with them.

        Per dataset, in one pass over its events: the chain itself (seq, links, hashes, head); the
        terms its ``registered`` event states (unit, contribution bound, delta, cap, filter) and
        each ``block_added`` event's block (name, cap, n_records); every charge's events replayed
        through :data:`TRANSITIONS` (see :class:`ChargeReplay`: an illegal transition is tampering,
        even with valid hashes); and the invariants the write path keeps (a block's cap never above
        the dataset's, no block added while a whole-dataset charge counts, no whole-dataset charge
        on a partitioned dataset, a filter this code implements). Then the rows are compared with
        what the chain gives: ``datasets``, ``blocks``, ``charges`` and ``charge_blocks``, and the
        derived ``charge_states`` (state, steps counted, lease, dataset) and ``spend_totals``
        (steps and stored one-step RDP curves).

        A handful of queries per dataset, none per charge. On PostgreSQL the reads share one
        REPEATABLE READ snapshot, so a concurrent admission cannot make verify see half of a write;
        SQLite's ``BEGIN IMMEDIATE`` already serializes them.
        """
        problems: list[str] = []
        drift: list[str] = []
        with self.engine.connect() as conn:
            if self._pg:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            d = _DATASETS.c
            datasets = conn.execute(select(d.id, d.name, d.unit, d.contribution_bound, d.delta, d.epsilon_cap, d.accountant,
                                           d.filter_spec, d.head_seq, d.head_hash).order_by(d.id)).all()
            cs = _STATES.c
            index = {r.charge_id: r for r in conn.execute(
                select(cs.charge_id, cs.dataset_id, cs.state, cs.steps_counted, cs.lease_expires_at))}
            for ds in datasets:
                chain = self._replay_chain(conn, ds, problems)
                problems.extend(self._verify_terms(conn, ds, chain))
                problems.extend(self._verify_charge_rows(conn, ds, chain))
                problems.extend(self._verify_spend_index(conn, ds, chain, index, drift))
            names = {ds.id: ds.name for ds in datasets}
            for cid, row in index.items():  # rows no chain's replay claimed (those were popped)
                problems.append(f"dataset {names.get(row.dataset_id, row.dataset_id)!r}: charge {cid} has a state index row "
                                "but no reserved event in any chain (edited)")
        return VerifyReport(tuple(problems), tuple(drift))

    @staticmethod
    def _replay_chain(conn: Connection, ds: Any, problems: list[str],
                      resume: Optional[tuple[int, str, _Chain]] = None) -> _Chain:
        """One pass over the dataset's events: check the hash chain and replay what it records.

        Problems of the chain itself and of the rules it must follow are appended to ``problems``;
        the returned :class:`_Chain` is what the events give, for comparison with the rows.

        Args:
            resume: (seq, hash, chain) of a prefix already verified: replay only the events after
                ``seq`` into ``chain`` (changed in place), the first of them linking to ``hash``.
        """
        name = ds.name
        start_seq, prev, chain = resume or (0, GENESIS, _Chain())
        expected_seq = start_seq + 1
        e = _EVENTS.c
        for ev in conn.execute(select(e.seq, e.charge_id, e.kind, e.payload, e.created_at, e.prev_hash, e.hash)
                               .where(e.dataset_id == ds.id, e.seq > start_seq).order_by(e.seq)):
            if ev.seq != expected_seq:
                problems.append(f"dataset {name!r}: event seq {ev.seq} found where {expected_seq} was expected (deleted or reordered)")
            if ev.prev_hash != prev:
                problems.append(f"dataset {name!r}: event {ev.seq} does not link to the previous event")
            if _event_hash(name, ev.seq, ev.kind, ev.charge_id, ev.payload, ev.created_at, ev.prev_hash) != ev.hash:
                problems.append(f"dataset {name!r}: event {ev.seq} was edited (hash mismatch)")
            prev, expected_seq = ev.hash, ev.seq + 1
            broken = _replay_event(chain, ev.seq, ev.kind, ev.charge_id, ev.payload, ev.created_at)
            if broken:
                problems.append(f"dataset {name!r}: {broken}")
        if ds.head_seq != expected_seq - 1 or ds.head_hash != prev:
            problems.append(f"dataset {name!r}: chain head is seq {ds.head_seq} but the log ends at {expected_seq - 1} (truncated or edited)")
        if chain.terms is None:
            problems.append(f"dataset {name!r}: its chain has no valid registered event (deleted or edited)")
        return chain

    @staticmethod
    def _verify_terms(conn: Connection, ds: Any, chain: _Chain) -> list[str]:
        """The ``datasets`` row and the ``blocks`` rows against the registered and block_added events."""
        problems = []
        if chain.terms is not None:
            for key in TERM_FIELDS:
                recorded, found = getattr(chain.terms, key), getattr(ds, key)
                if recorded != found:
                    problems.append(f"dataset {ds.name!r}: {key} is {found!r} in the datasets table but {recorded!r} in its "
                                    "registered event (edited)")
        b = _BLOCKS.c
        rows = {r.name: r for r in conn.execute(select(b.name, b.epsilon_cap, b.n_records).where(b.dataset_id == ds.id))}
        for block in sorted(set(rows) | set(chain.blocks)):
            recorded, row = chain.blocks.get(block), rows.get(block)
            if recorded is None:
                problems.append(f"dataset {ds.name!r}: block {block!r} has a row but no block_added event (edited)")
            elif row is None:
                problems.append(f"dataset {ds.name!r}: block {block!r} has a block_added event but no row (deleted)")
            else:
                for key in ("epsilon_cap", "n_records"):
                    if getattr(recorded, key) != getattr(row, key):
                        problems.append(f"dataset {ds.name!r}: block {block!r} {key} is {getattr(row, key)!r} in the blocks table "
                                        f"but {getattr(recorded, key)!r} in its block_added event (edited)")
        return problems

    @staticmethod
    def _verify_charge_rows(conn: Connection, ds: Any, chain: _Chain) -> list[str]:
        """Every charge row and its block links against the charge's ``reserved`` event.

        A charge's blocks are compared as sets: its event lists them in block-id order (the order
        :meth:`reserve` reads them in), and that order is kept as written.
        """
        problems = []
        c = ChargeRow.__table__.c
        cb = ChargeBlockRow.__table__.c
        links: dict[str, list[str]] = {}
        for cid, block, block_dataset in conn.execute(
            select(cb.charge_id, _BLOCKS.c.name, _BLOCKS.c.dataset_id)
            .join(_BLOCKS, _BLOCKS.c.id == cb.block_id).join(ChargeRow.__table__, c.id == cb.charge_id)
            .where(c.dataset_id == ds.id)
        ):
            links.setdefault(cid, []).append(block if block_dataset == ds.id else f"{block} (of another dataset)")
        with_row = set()
        for row in conn.execute(select(c.id, *[c[name] for name in CHARGE_FIELDS]).where(c.dataset_id == ds.id)):
            with_row.add(row.id)
            replay = chain.charges.get(row.id)
            if replay is None or replay.reserved is None:
                problems.append(f"dataset {ds.name!r}: charge {row.id} has a row but no reserved event (edited)")
                continue
            recorded = dict(replay.reserved)
            found = {**_charge_payload(row), "blocks": links.get(row.id, [])}
            differs = sorted(k for k in set(recorded) | set(found) if k != "blocks" and recorded.get(k) != found.get(k))
            if sorted(recorded.get("blocks") or []) != sorted(found["blocks"]):
                differs.append("blocks")
            if differs:
                problems.append(f"dataset {ds.name!r}: charge {row.id} differs from its reserved event in {', '.join(differs)} (edited)")
        for cid, replay in chain.charges.items():
            if replay.reserved is not None and cid not in with_row:
                problems.append(f"dataset {ds.name!r}: charge {cid} has events but no row (deleted)")
        return problems

    @staticmethod
    def _verify_spend_index(conn: Connection, ds: Any, chain: _Chain, index: dict[str, Any], drift: list[str]) -> list[str]:
        """Recompute ``charge_states`` and ``spend_totals`` from the replayed events; list differences.

        ``index`` holds every ``charge_states`` row; the rows of this dataset's charges are popped
        from it. A stored one-step RDP curve that differs from the recomputed one by at most
        :data:`CURVE_DRIFT_RTOL` (relative) is drift and goes to ``drift``; more is an edit.
        """
        problems = []
        expected_totals: dict[tuple[str, float, float], int] = {}
        for cid, replay in chain.charges.items():
            if replay.reserved is None:
                continue
            recorded = {"dataset_id": ds.id, "state": replay.state, "steps_counted": replay.counted,
                        "lease_expires_at": replay.reserved.get("lease_expires_at")}
            row = index.pop(cid, None)
            if row is None:
                problems.append(f"dataset {ds.name!r}: charge {cid} has no state index row; the events say "
                                f"{replay.state} counting {replay.counted} steps (deleted)")
            else:
                for key, value in recorded.items():
                    if getattr(row, key) != value:
                        problems.append(f"dataset {ds.name!r}: charge {cid} state index says {key} {getattr(row, key)!r}, "
                                        f"the events say {value!r} (edited)")
            sigma, q = replay.reserved.get("noise_multiplier"), replay.reserved.get("sample_rate")
            for scope in replay.reserved.get("blocks") or (WHOLE,):
                expected_totals[(scope, sigma, q)] = expected_totals.get((scope, sigma, q), 0) + replay.counted
        t = _TOTALS.c
        rows = conn.execute(select(t.scope, t.noise_multiplier, t.sample_rate, t.steps, t.rdp_per_step)
                            .where(t.dataset_id == ds.id)).all()
        found_totals = {(r.scope, r.noise_multiplier, r.sample_rate): r.steps for r in rows}
        for key in sorted(set(expected_totals) | set(found_totals), key=repr):
            if expected_totals.get(key, 0) != found_totals.get(key, 0):
                problems.append(f"dataset {ds.name!r}: spend total for scope {key[0] or '(whole dataset)'!r}, sigma {key[1]}, "
                                f"q {key[2]} is {found_totals.get(key, 0)} steps; the charges give {expected_totals.get(key, 0)} (edited)")
        try:  # the filter the chain registered (a row that differs is reported by _verify_terms)
            f = _filter(chain.terms.accountant, chain.terms.filter_spec) if chain.terms else _filter(ds.accountant, ds.filter_spec)
        except LedgerError:
            return problems  # reported with the terms; no curve can be judged without the filter
        for r in rows:
            where = f"dataset {ds.name!r}: stored RDP curve for scope {r.scope or '(whole dataset)'!r}, sigma {r.noise_multiplier}, q {r.sample_rate}"
            verdict = _compare_curve(r.rdp_per_step, r.noise_multiplier, r.sample_rate, f)
            if verdict is None:
                continue
            if verdict.startswith("drift"):
                drift.append(f"{where}: {verdict}")
            else:
                problems.append(f"{where} differs from the one (sigma, q) gives: {verdict} (edited)")
        return problems

    def history(self, dataset: str) -> Iterator[dict[str, Any]]:
        with Session(self.engine) as session:
            ds = session.scalars(select(DatasetRow).where(DatasetRow.name == dataset)).one_or_none()
            if ds is None:
                raise LedgerError(f"dataset {dataset!r} is not registered in the ledger")
            for ev in session.scalars(select(EventRow).where(EventRow.dataset_id == ds.id).order_by(EventRow.seq)):
                yield {"seq": ev.seq, "at": ev.created_at, "event": ev.kind, "charge": ev.charge_id, "payload": json.loads(ev.payload)}


# --------------------------------------------------------------------------- verification: what the chain says
#
# Pure functions of the events, shared by Ledger.verify_report and usable by the write path: the
# terms a dataset and its blocks were registered with, and a charge's events replayed through the
# state machine.

#: The states a charge's first event may take: those no transition leads to (``reserved``).
INITIAL_STATES: frozenset[str] = frozenset(TRANSITIONS) - frozenset().union(*TRANSITIONS.values())

#: Fields of a dataset's terms, as its ``registered`` event and its ``datasets`` row both hold them.
TERM_FIELDS = ("unit", "contribution_bound", "delta", "epsilon_cap", "accountant", "filter_spec")

#: A stored one-step RDP curve within this relative difference of the recomputed one (at every
#: order) is numerical drift, not an edit. The curve is computed in double precision from (sigma, q)
#: by two independent implementations; a library upgrade (numpy, scipy, the RDP code itself) moves
#: its last few digits, i.e. relative differences of 1e-16 to 1e-12. An edit that makes room for a
#: run must lower the curve by far more (a percent of budget is a relative 1e-2), so 1e-9 separates
#: the two with room on both sides.
CURVE_DRIFT_RTOL = 1e-9


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`Ledger.verify_report` found.

    Attributes:
        problems: edits, deletions and broken rules; the ledger verifies only when this is empty.
        drift: stored RDP curves that differ from the recomputed ones in their last digits only
            (see :data:`CURVE_DRIFT_RTOL`): reported, not failed. No lower figure is adopted:
            admission keeps counting the stored curve.
    """

    problems: tuple[str, ...] = ()
    drift: tuple[str, ...] = ()


@dataclass(frozen=True)
class DatasetTerms:
    """A dataset's terms as its chained ``registered`` event states them."""

    unit: str
    contribution_bound: Optional[int]
    delta: float
    epsilon_cap: float
    accountant: str
    #: The filter's orders and delta shares as canonical JSON (``datasets.filter_spec``); None for v1.
    filter_spec: Optional[str] = None

    @classmethod
    def from_event(cls, payload: dict[str, Any]) -> "DatasetTerms":
        """The terms of a ``registered`` event's payload (field ``filter``: the v2 filter's orders
        and delta shares, absent for v1). Raises LedgerError if a field is missing."""
        fields = [k for k in TERM_FIELDS if k != "filter_spec"]
        missing = [k for k in fields if k not in payload]
        if missing:
            raise LedgerError(f"registered event lacks field(s) {missing}")
        spec = payload.get("filter")
        return cls(**{k: payload[k] for k in fields},
                   filter_spec=None if spec is None else json.dumps(spec, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class BlockTerms:
    """A block as its chained ``block_added`` event states it."""

    name: str
    epsilon_cap: float
    n_records: int

    @classmethod
    def from_event(cls, payload: dict[str, Any]) -> "BlockTerms":
        """The block of a ``block_added`` event's payload. Raises LedgerError if a field is missing."""
        missing = [k for k in ("block", "epsilon_cap", "n_records") if k not in payload]
        if missing:
            raise LedgerError(f"block_added event lacks field(s) {missing}")
        return cls(payload["block"], payload["epsilon_cap"], payload["n_records"])


def _steps(payload: dict[str, Any], key: str) -> Optional[int]:
    """``payload[key]`` when it is a non-negative integer (a step count), else None."""
    value = payload.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass
class ChargeReplay:
    """One charge's events replayed through the state machine, in chain order.

    The rules come from :data:`TRANSITIONS` (and :data:`INITIAL_STATES`), the same table the write
    path enforces, plus what the write path checks of the step counts: ``progress`` and
    ``finished`` only while running and before the trainer finished, each within [last progress,
    reserved]; a commit within the same range and, below the reserved steps, at exactly the
    finished result; an expiry only once the lease has passed. An event that breaks a rule is not
    applied, so :attr:`state` and :attr:`counted` are what the legal events give.
    """

    #: Payload of the charge's ``reserved`` event (its terms, blocks and lease); None until then.
    reserved: Optional[dict[str, Any]] = None
    state: Optional[str] = None
    progress: int = 0
    finished: Optional[int] = None
    steps_run: Optional[int] = None

    @property
    def planned(self) -> int:
        return int(self.reserved["steps_planned"]) if self.reserved else 0

    @property
    def counted(self) -> int:
        """The steps the charge counts now (what ``charge_states.steps_counted`` must hold)."""
        if self.state is None or self.state in UNCHARGED:
            return 0
        if self.state == COMMITTED and self.steps_run is not None:
            return self.steps_run
        return self.planned

    def apply(self, kind: str, payload: dict[str, Any], created_at: str = "") -> Optional[str]:
        """Apply the charge's next event; return the rule it breaks (and change nothing), or None.

        Events that carry no state (``annotated``, ``gate_decision``) change nothing, but may only
        follow the charge's reservation like every other.
        """
        if self.state is None and kind not in INITIAL_STATES:
            return f"its first event is {kind!r}; a charge's first event must be one of {sorted(INITIAL_STATES)}"
        if kind in (PROGRESS, FINISHED):
            if self.state != RUNNING:
                return f"a {kind!r} event while the charge is {self.state!r} (recorded only while running)"
            if self.finished is not None:
                return f"a {kind!r} event after the trainer's finished result"
            key = "steps_done" if kind == PROGRESS else "steps_run"
            steps = _steps(payload, key)
            if steps is None or not self.progress <= steps <= self.planned:
                return f"{kind!r} {key} {payload.get(key)!r} is outside [{self.progress}, {self.planned}] (last progress, reserved)"
            if kind == PROGRESS:
                self.progress = steps
            else:
                self.finished = steps
            return None
        if kind not in TRANSITIONS:
            return None
        allowed = INITIAL_STATES if self.state is None else TRANSITIONS[self.state]
        if kind not in allowed:
            return (f"illegal transition {self.state!r} -> {kind!r} (the state machine allows "
                    f"{sorted(allowed) or 'nothing'} from {self.state!r})")
        if kind == RESERVED:
            if _steps(payload, "steps_planned") is None or not isinstance(payload.get("blocks", []), list):
                return "its reserved event has no valid steps_planned or blocks"
            self.reserved = payload
        elif kind == COMMITTED:
            steps = _steps(payload, "steps_run")
            if steps is None or not self.progress <= steps <= self.planned:
                return f"committed steps_run {payload.get('steps_run')!r} is outside [{self.progress}, {self.planned}] (last progress, reserved)"
            if steps < self.planned and steps != self.finished:
                return (f"committed at {steps} of {self.planned} reserved steps, which needs a finished result of "
                        f"exactly {steps} steps; it has {self.finished}")
            self.steps_run = steps
        elif kind == EXPIRED and created_at < str(self.reserved.get("lease_expires_at", "")):
            return f"expired at {created_at}, before its lease ran out at {self.reserved.get('lease_expires_at')}"
        self.state = kind
        return None


def replay_charge(events: Iterable[tuple[str, dict[str, Any], str]]) -> tuple[ChargeReplay, list[str]]:
    """Replay one charge's events, given as (kind, payload, created_at) in chain order; return the
    replay and the rules broken (one line per offending event)."""
    replay, broken = ChargeReplay(), []
    for kind, payload, created_at in events:
        rule = replay.apply(kind, payload, created_at)
        if rule:
            broken.append(rule)
    return replay, broken


@dataclass
class _Chain:
    """What one dataset's events give, in chain order (built by :func:`_replay_event`)."""

    terms: Optional[DatasetTerms] = None
    blocks: dict[str, BlockTerms] = field(default_factory=dict)
    charges: dict[str, ChargeReplay] = field(default_factory=dict)


def _replay_event(chain: _Chain, seq: int, kind: str, charge_id: Optional[str], body: str, created_at: str) -> Optional[str]:
    """Apply one event to ``chain``; return the problem it shows (without the dataset's name), or None.

    Checks the dataset-level rules at the point the event was appended: one ``registered`` event,
    first; a block's cap never above the dataset's; no block added while a whole-dataset charge
    counts; a charge reads only blocks added before it, and not the whole of a partitioned dataset.
    """
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        return f"event {seq} ({kind}) has a payload that is not a JSON object (edited)"
    if kind == "registered":
        if seq != 1 or chain.terms is not None or charge_id is not None:
            return f"event {seq} registers the dataset again; a dataset is registered once, by its first event"
        try:
            chain.terms = DatasetTerms.from_event(payload)
        except LedgerError as exc:
            return f"event {seq}: {exc} (edited)"
        try:
            _filter(chain.terms.accountant, chain.terms.filter_spec)
        except LedgerError as exc:
            return f"its registered event names {exc}"
        return None
    if kind == "block_added":
        try:
            block = BlockTerms.from_event(payload)
        except LedgerError as exc:
            return f"event {seq}: {exc} (edited)"
        if block.name in chain.blocks:
            return f"event {seq} adds block {block.name!r} again; blocks are append-only"
        chain.blocks[block.name] = block
        if chain.terms is not None and block.epsilon_cap > chain.terms.epsilon_cap:
            return f"block {block.name!r} (event {seq}) has cap {block.epsilon_cap!r}, above the dataset's cap {chain.terms.epsilon_cap!r}"
        whole = sorted(cid for cid, r in chain.charges.items()
                       if r.reserved is not None and not r.reserved.get("blocks") and r.state not in UNCHARGED)
        if whole:
            return (f"block {block.name!r} (event {seq}) was added while whole-dataset charge(s) {', '.join(whole)} count; "
                    "a dataset with whole-dataset spend cannot be partitioned")
        return None
    if charge_id is None:
        if kind in TRANSITIONS or kind in (PROGRESS, FINISHED):
            return f"event {seq} ({kind}) names no charge"
        return None
    replay = chain.charges.setdefault(charge_id, ChargeReplay())
    rule = replay.apply(kind, payload, created_at)
    if rule:
        return f"charge {charge_id}: event {seq} ({kind}) breaks the state machine: {rule} (tampering)"
    if kind == RESERVED:
        blocks = payload.get("blocks") or []
        missing = sorted(set(blocks) - set(chain.blocks))
        if missing:
            return f"charge {charge_id} (event {seq}) reads block(s) {missing} that the chain has not added"
        if chain.blocks and not blocks:
            return f"charge {charge_id} (event {seq}) reads the whole dataset after it was partitioned into blocks"
    return None


def _compare_curve(stored: Optional[str], sigma: float, q: float, f: filters.PrivacyFilter) -> Optional[str]:
    """How a stored one-step RDP curve compares with the one (sigma, q) gives now at the filter's
    orders: None when equal, ``"drift: ..."`` within :data:`CURVE_DRIFT_RTOL`, else what is wrong."""
    try:
        curve = np.asarray(json.loads(stored), dtype=float) if stored is not None else None
    except (ValueError, TypeError):
        return "it is not a list of numbers"
    if curve is None:
        return "it is missing"
    fresh = np.asarray(f.one_step(sigma, q))
    if curve.shape != fresh.shape:
        return f"it has {curve.size} orders, not {fresh.size}"
    if np.array_equal(curve, fresh):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(curve == fresh, 0.0, np.abs(curve - fresh) / np.abs(fresh))
    rel = np.where(np.isnan(rel), np.inf, rel)  # inf against a finite value, or nan: never drift
    worst = float(np.max(rel))
    if not worst <= CURVE_DRIFT_RTOL:
        return f"relative difference up to {worst:.3g}"
    lower = int(np.sum(curve < fresh))
    return (f"drift: it differs from the recomputed curve by at most {worst:.1e} relative (below {CURVE_DRIFT_RTOL:g}: "
            f"numerical drift such as a library upgrade, not an edit); the stored curve is lower at {lower} of "
            f"{fresh.size} orders; admission counts the stored curve")


def _describe_filter(accountant: Optional[str], spec: Optional[str]) -> str:
    try:
        return _filter(accountant, spec).describe()
    except LedgerError:
        return repr(accountant)


