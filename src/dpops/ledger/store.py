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

import json
import logging
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from sqlalchemy import (
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from dpops.errors import (
    ChargeNotFoundError,
    DatasetNotRegisteredError,
    LedgerError,
)
from dpops.ledger.admission import _Admission
from dpops.ledger.chain import _Chain, _event_hash, _now
from dpops.ledger.engine import _pg_engine, _raise_unavailable
from dpops.ledger.lifecycle import _Lifecycle
from dpops.ledger.reads import _Reads
from dpops.ledger.registration import _Registration
from dpops.ledger.schema import (
    _BLOCKS,
    _DATASETS,
    _EVENTS,
    _NO_WRITE_LOCK,
    _STATES,
    _TOTALS,
    WHOLE,
    BlockRow,
    ChargeBlockRow,
    ChargeRow,
    _Locked,
    ensure_schema,
)
from dpops.ledger.spend import _mechanism, _rdp_json
from dpops.ledger.states import (
    COMMITTED,
    DEFAULT_LEASE_SECONDS,
    EXPIRED,
    MODEL_BOUND,
    RESERVED,
    TRANSITIONS,
    ChainHead,
    Charge,
)
from dpops.ledger.verify import _Verification
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian

if TYPE_CHECKING:
    from dpops.ledger.anchors import AnchorLog

_log = logging.getLogger("dpops.ledger")


class Ledger(_Registration, _Admission, _Lifecycle, _Reads, _Verification):
    """The ledger behind a SQLAlchemy URL (``sqlite:///path`` or ``postgresql+psycopg://...``).

    Args:
        url: database URL.
        create: check the schema (:func:`ensure_schema`): create an empty database at head, open
            one at head with no DDL, refuse one behind or ahead of this code with
            :class:`~dpops.errors.LedgerSchemaError` (``dpops ledger upgrade`` migrates). False
            checks nothing (the upgrade command's own engine).
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
                # read-check-write admission cannot interleave with another one (except on a
                # connection that only reads the schema's revision: see schema_revision).
                if not conn.get_execution_options().get(_NO_WRITE_LOCK):
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
            raise DatasetNotRegisteredError(f"dataset {name!r} is not registered in the ledger")
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
            raise ChargeNotFoundError(f"charge {charge_id!r} does not exist")
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
