"""Reads: charges with their replayed state, budgets, the spend counted, a dataset's history."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from sqlalchemy import (
    func,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dpops.errors import (
    DatasetNotRegisteredError,
)
from dpops.ledger.schema import _CHARGES, _DATASETS, _STATES, _TOTALS, WHOLE, DatasetRow, EventRow
from dpops.ledger.spend import _epsilon, _filter, _mechanism
from dpops.ledger.states import (
    BlockBudget,
    Charge,
    DatasetBudget,
)
from dpops.privacy import accounting
from dpops.privacy.accounting import SubsampledGaussian


class _Reads:
    """Reads: charges with their replayed state, budgets, the spend counted, a dataset's history."""

    @staticmethod
    def _dataset(conn: Session | Connection, name: str) -> Any:
        """The dataset's row (id, name, unit, delta, epsilon_cap), unlocked; LedgerError if unknown."""
        d = _DATASETS.c
        row = conn.execute(select(d.id, d.name, d.unit, d.delta, d.epsilon_cap, d.accountant, d.filter_spec)
                           .where(d.name == name)).one_or_none()
        if row is None:
            raise DatasetNotRegisteredError(f"dataset {name!r} is not registered in the ledger")
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
            except DatasetNotRegisteredError:
                return []
            return self._scope_totals(conn, ds.id, block)

    def budgets(self, *, estimate: bool = False) -> list[DatasetBudget]:
        return [self.budget(name, estimate=estimate) for name in self.datasets()]

    def history(self, dataset: str) -> Iterator[dict[str, Any]]:
        with Session(self.engine) as session:
            ds = session.scalars(select(DatasetRow).where(DatasetRow.name == dataset)).one_or_none()
            if ds is None:
                raise DatasetNotRegisteredError(f"dataset {dataset!r} is not registered in the ledger")
            for ev in session.scalars(select(EventRow).where(EventRow.dataset_id == ds.id).order_by(EventRow.seq)):
                yield {"seq": ev.seq, "at": ev.created_at, "event": ev.kind, "charge": ev.charge_id, "payload": json.loads(ev.payload)}
