"""Verification: recompute every chain, the charges' rows and the spend index from the events."""

from __future__ import annotations

from typing import Any, Optional

from sqlalchemy import (
    select,
)
from sqlalchemy.engine import Connection

from dpops.errors import (
    LedgerError,
)
from dpops.ledger.chain import (
    CHARGE_FIELDS,
    TERM_FIELDS,
    VerifyReport,
    _Chain,
    _charge_payload,
    _compare_curve,
    _event_hash,
    _replay_event,
)
from dpops.ledger.schema import _BLOCKS, _DATASETS, _EVENTS, _STATES, _TOTALS, WHOLE, ChargeBlockRow, ChargeRow
from dpops.ledger.spend import _filter
from dpops.ledger.states import (
    GENESIS,
)


class _Verification:
    """Verification: recompute every chain, the charges' rows and the spend index from the events."""

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
