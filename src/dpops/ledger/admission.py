"""Admission: one write transaction that checks the record and the filter, then appends a reservation."""

from __future__ import annotations

import uuid
from typing import Any, Optional

from sqlalchemy import (
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dpops.errors import (
    BudgetExceededError,
    ConfigError,
    LedgerError,
)
from dpops.ledger.chain import CHARGE_FIELDS, _Chain, _charge_fields, _now
from dpops.ledger.engine import _SPEC_HASH, _check_count, _check_name
from dpops.ledger.schema import (
    _CHARGES,
    _DATASETS,
    _PG_DATA_VERSION_LOCK,
    _STATES,
    _USER_BLOCKS,
    WHOLE,
    ChargeBlockRow,
    ChargeRow,
    _Locked,
)
from dpops.ledger.spend import _epsilon, _filter, _rdp_json
from dpops.ledger.states import (
    ADD_REMOVE,
    MAX_ID,
    MAX_NAME,
    RESERVED,
    Charge,
)
from dpops.privacy import accounting
from dpops.privacy.accounting import SubsampledGaussian


class _Admission:
    """Admission: one write transaction that checks the record and the filter, then appends a reservation."""

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
