"""Registering datasets and their blocks, and reading the terms they were registered with."""

from __future__ import annotations

import json
from typing import Optional

from sqlalchemy import (
    func,
    insert,
    select,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from dpops.errors import (
    BlockExistsError,
    ConfigError,
    DatasetNotRegisteredError,
    LedgerError,
)
from dpops.ledger.chain import _describe_filter, _now
from dpops.ledger.engine import _check_count, _check_name
from dpops.ledger.schema import _BLOCKS, _DATASETS, _EVENTS, _PG_REGISTER_LOCK, _STATES, ChargeBlockRow, _Locked
from dpops.ledger.spend import _epsilon, _filter
from dpops.ledger.states import (
    GENESIS,
    MAX_EPSILON_CAP,
    UNCHARGED,
)
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian


class _Registration:
    """Registering datasets and their blocks, and reading the terms they were registered with."""

    def register_dataset(
        self, *, name: str, unit: str, delta: float, epsilon_cap: float, contribution_bound: Optional[int] = None,
        source: Optional[str] = None, linked_from: Optional[str] = None,
        privacy_filter: filters.PrivacyFilter = filters.GRID_FILTER, filter_from_config: bool = False,
    ) -> None:
        """Register a dataset, or check that the registered one has the same terms.

        ``privacy_filter`` (its orders and delta shares) is fixed here, for the life of the
        dataset, and stored in the ``registered`` event: the pipeline passes the one chosen from
        the registering job's mechanism (:func:`dpops.filters.choose_filter`) or the config's
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
                raise DatasetNotRegisteredError(
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
                raise BlockExistsError(f"dataset {dataset!r} already has a block {name!r}; blocks are append-only")
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
