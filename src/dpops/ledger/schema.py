"""The ledger's tables and its schema's lifecycle (Alembic): open checks, ``dpops ledger upgrade`` migrates.

Opening a ledger (:func:`ensure_schema`) reads the schema revision and never migrates one that
exists; :func:`migrate_schema` (the command) does, under a database-wide lock.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import (
    Double,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dpops.errors import (
    LedgerSchemaError,
)
from dpops.ledger.spend import _filter
from dpops.ledger.states import (
    GENESIS,
)
from dpops.privacy import filters

#: PostgreSQL advisory lock serialising model bindings across datasets (one charge per model version).
_PG_BINDING_LOCK = 7_274_002


MIGRATIONS = Path(__file__).resolve().parent / "migrations"


_PG_MIGRATION_LOCK = 7_274_001


_PG_REGISTER_LOCK = 7_274_003  # (7_274_002 serialises model bindings)


#: First key of the two-key PostgreSQL transaction lock on one data version (second: its hash).
_PG_DATA_VERSION_LOCK = 7_274_004


def _alembic_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, *, empty_only: bool = False) -> Optional[str]:
    """Bring the ledger's schema to the newest Alembic revision (idempotent, safe to race); return
    the revision it found, read under the lock (None: an empty database).

    The migration runs in one transaction holding a database-wide lock: ``BEGIN IMMEDIATE`` on
    SQLite, an advisory transaction lock on PostgreSQL. ``dpops ledger upgrade`` calls it; so does
    the first open of an empty database (:func:`ensure_schema`), with ``empty_only``: then a schema
    another process created in between is left as it is, whatever its revision. A revision this
    code does not ship is refused (a newer dpops migrated it).
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = _alembic_config()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        found = MigrationContext.configure(conn).get_current_revision()
        if found is not None and found not in known_revisions():
            raise LedgerSchemaError(_ahead_message(found))
        if empty_only and found is not None:
            return found
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return found


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest Alembic revision this code ships (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


@functools.lru_cache(maxsize=1)
def known_revisions() -> frozenset[str]:
    """Every Alembic revision this code ships (read once per process)."""
    from alembic.script import ScriptDirectory

    return frozenset(s.revision for s in ScriptDirectory(str(MIGRATIONS)).walk_revisions())


#: Execution option of a connection on which the SQLite engine's ``BEGIN IMMEDIATE`` is skipped: its
#: statements run in autocommit, each holding at most a shared lock while it reads.
_NO_WRITE_LOCK = "dpops_no_write_lock"


def schema_revision(engine: Engine) -> Optional[str]:
    """The ledger schema's current Alembic revision (None for an empty database).

    Reads only, and takes no database-wide lock: on SQLite it does not begin the ledger's
    ``BEGIN IMMEDIATE`` transaction, on PostgreSQL it takes no advisory lock.
    """
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        conn.execution_options(**{_NO_WRITE_LOCK: True})
        return MigrationContext.configure(conn).get_current_revision()


def _upgrade_hint(engine: Engine) -> str:
    admin = " as the admin role (DPOPS_LEDGER_ADMIN_URL)" if engine.dialect.name == "postgresql" else ""
    return f"run `dpops ledger upgrade`{admin}"


def _behind_message(engine: Engine, current: str) -> str:
    return (f"the ledger's schema is at revision {current} and this dpops needs {head_revision()}; opening a ledger "
            f"never migrates it: take a backup, {_upgrade_hint(engine)}, then open the ledger again")


def _ahead_message(current: str) -> str:
    return (f"the ledger's schema is at revision {current!r}, which this dpops does not know (its newest is "
            f"{head_revision()}): a newer dpops migrated it. Use that version; a schema is never downgraded")


def _no_schema_message(engine: Engine) -> str:
    return (f"the ledger has no schema yet (revision none; this dpops needs {head_revision()}) and role "
            f"{engine.url.username or 'this role'!r} may not create it: {_upgrade_hint(engine)}, then open the ledger again")


def ensure_schema(engine: Engine) -> None:
    """Check that the ledger's schema is the one this code needs, the way MLflow's store does.

    * An empty database (no ``alembic_version``) is created at head here, on first open, so a fresh
      workspace (the demo) needs no step first. A role that may not create tables (the PostgreSQL
      pipeline role, see :func:`grant_pipeline_role`) gets a :class:`LedgerSchemaError` naming
      ``dpops ledger upgrade`` instead.
    * A schema at head opens with no DDL and no lock (:func:`schema_revision` only reads).
    * A schema behind head is never migrated here: :class:`LedgerSchemaError` names its revision,
      the one needed, and ``dpops ledger upgrade`` (:func:`upgrade`), which an operator runs after
      a backup, as the admin role on PostgreSQL.
    * A schema ahead of this code (a revision it does not ship) is refused too.
    """
    from sqlalchemy.exc import DBAPIError

    current = schema_revision(engine)
    if current == head_revision():
        return
    if current is not None:
        raise LedgerSchemaError(_behind_message(engine, current) if current in known_revisions() else _ahead_message(current))
    try:
        found = upgrade(engine, empty_only=True)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            raise LedgerSchemaError(_no_schema_message(engine)) from None
        raise
    if found not in (None, head_revision()):  # another process created it first, with an older dpops: left as it is
        raise LedgerSchemaError(_behind_message(engine, found))


def migrate_schema(engine: Engine) -> tuple[Optional[str], str]:
    """What ``dpops ledger upgrade`` runs: migrate the schema to head (:func:`upgrade`), refusing,
    naming the admin URL, a PostgreSQL role that does not own the tables. Returns (from, to)."""
    from sqlalchemy.exc import DBAPIError

    current = schema_revision(engine)
    if current is not None and current not in known_revisions():
        raise LedgerSchemaError(_ahead_message(current))
    if current == head_revision():
        return current, current
    if engine.dialect.name == "postgresql" and current is not None:
        with engine.connect() as conn:  # whoever does not own the schema's tables may not migrate it
            may = conn.scalar(text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                                   "WHERE oid = to_regclass('alembic_version')"))
        if may is False:
            raise LedgerSchemaError(f"the ledger's schema is at revision {current} and this dpops needs {head_revision()}; "
                                    f"role {engine.url.username or 'this role'!r} may not migrate it: {_upgrade_hint(engine)}")
    try:
        found = upgrade(engine)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == "42501":  # insufficient_privilege
            raise LedgerSchemaError(_no_schema_message(engine) if current is None else
                                    f"role {engine.url.username or 'this role'!r} may not migrate the ledger's schema: "
                                    f"{_upgrade_hint(engine)}") from None
        raise
    return found, head_revision()


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
