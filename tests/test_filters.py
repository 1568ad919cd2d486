"""Per-dataset privacy filters (issue 18): more runs per budget, the same adaptive guarantee.

The filter's orders and delta shares are fixed when a dataset is registered and stored in its
hash-chained ``registered`` event; the figures are checked against independent computations with
``dp_accounting`` (and Opacus where its series is the reference).
"""

import json
import math
import random

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from dpops.config.schema import DatasetConfig, DPSettings
from dpops.errors import BudgetExceededError, ConfigError, LedgerError, LedgerSchemaError
from dpops.ledger import schema as ledger_schema
from dpops.ledger.store import Ledger
from dpops.pipeline import planning as privacy
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian
from dpops.privacy.filters import PrivacyFilter
from tests.helpers import tamper

REF = SubsampledGaussian(1.0, 0.01, 1000)


def _one_order(alpha: float) -> PrivacyFilter:
    return PrivacyFilter(filters.FILTER_V2, (alpha,), (1.0,))


def _dp_accounting_epsilon(events, alpha: float, delta: float) -> float:
    acc = RdpAccountant(orders=[alpha])
    for e in events:
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)), e.steps)
    return acc.get_epsilon(delta)


# ----------------------------------------------------------------- the filter's arithmetic


def test_a_single_order_filter_equals_dp_accountings_single_order_accountant_on_an_adaptive_history():
    """The Feldman-Zrnic filter at one order: its figure is the RDP at that order converted at all
    of delta, exactly what dp_accounting's RdpAccountant with that single order reports, whatever
    sequence of mechanisms an adaptive analyst picked; the filter admits while it stays in the cap."""
    rng = random.Random(7)
    alpha, delta, cap = 6.0, 1e-6, 6.0
    f = _one_order(alpha)
    history: list[SubsampledGaussian] = []
    admitted = 0
    for _ in range(60):
        # the analyst picks the next mechanism after seeing the state (adaptively)
        m = SubsampledGaussian(rng.choice([0.7, 1.0, 1.5, 3.0]), rng.choice([0.001, 0.004, 0.02]), rng.choice([50, 200, 800]))
        theirs_after = _dp_accounting_epsilon(history + [m], alpha, delta)
        assert f.epsilon(history + [m], delta=delta) == pytest.approx(theirs_after, rel=1e-9)
        if f.admits(history, m, delta=delta, cap=cap):
            assert theirs_after <= cap * (1 + 1e-9)
            history.append(m)
            admitted += 1
        else:
            assert theirs_after > cap * (1 - 1e-9)
    assert 3 <= admitted < 60  # the walk both admitted and refused


def test_delta_is_split_by_the_stored_shares_and_the_union_over_orders_is_taken():
    f = PrivacyFilter(filters.FILTER_V2, (3.0, 8.0), (0.25, 0.75))
    events = [REF]
    per_order = [_dp_accounting_epsilon(events, 3.0, 1e-5 * 0.25), _dp_accounting_epsilon(events, 8.0, 1e-5 * 0.75)]
    assert f.epsilon(events, delta=1e-5) == pytest.approx(min(per_order), rel=1e-9)
    # the v1 grid is the same rule with 24 orders and delta / 24 each
    grid = [_dp_accounting_epsilon(events, a, 1e-5 / 24) for a in filters.FILTER_ORDERS]
    assert filters.V1_FILTER.epsilon(events, delta=1e-5) == pytest.approx(min(grid), rel=1e-9)


def test_an_empty_filter_has_spent_nothing():
    """Old code: an empty filter read 0.19 (the conversion constant of its largest order)."""
    for f in (filters.V1_FILTER, filters.GRID_FILTER, _one_order(5.0)):
        assert f.epsilon([], delta=1e-6) == 0.0
    assert filters.filter_epsilon([], delta=1e-5) == 0.0


def test_runs_left_is_the_number_of_admissions_the_filter_grants():
    f = filters.choose_filter(REF, cap=8.0, delta=1e-5)
    spent: list[SubsampledGaussian] = []
    while f.admits(spent, REF, delta=1e-5, cap=8.0):
        assert f.runs_left(spent, REF, delta=1e-5, cap=8.0) >= 1
        spent.append(REF)
    assert f.runs_left(spent, REF, delta=1e-5, cap=8.0) == 0
    assert len(spent) == f.runs_left([], REF, delta=1e-5, cap=8.0) >= 13  # the target for this mechanism
    assert filters.V1_FILTER.runs_left([], REF, delta=1e-5, cap=8.0) == 10


def test_the_chosen_order_is_the_best_of_the_candidates_and_beats_the_grid():
    for m, cap, delta in [(REF, 8.0, 1e-5), (SubsampledGaussian(0.625, 0.00178, 150), 4.0, 1e-6),
                          (SubsampledGaussian(2.0, 0.05, 300), 2.0, 1e-5)]:
        chosen = filters.choose_filter(m, cap=cap, delta=delta)
        best = max(_one_order(a).runs_left([], m, delta=delta, cap=cap) for a in filters.CANDIDATE_ORDERS[::7])
        assert chosen.runs_left([], m, delta=delta, cap=cap) >= best
        assert chosen.runs_left([], m, delta=delta, cap=cap) >= filters.V1_FILTER.runs_left([], m, delta=delta, cap=cap)


def test_small_epsilons_are_not_floored_by_the_largest_order_of_a_grid():
    """Runs of tiny RDP (sigma 20): the v1 grid, whose largest order is 64, floors any figure at
    its conversion constant there (0.2 at delta 1e-5) and cannot admit one run within cap 0.1;
    the order chosen for the mechanism is large, and admits several."""
    tiny = SubsampledGaussian(20.0, 0.001, 100)
    assert filters.V1_FILTER.runs_left([], tiny, delta=1e-5, cap=0.1) == 0
    chosen = filters.choose_filter(tiny, cap=0.1, delta=1e-5)
    assert chosen.orders[0] > 64 and chosen.runs_left([], tiny, delta=1e-5, cap=0.1) >= 2
    assert 0 < chosen.epsilon([tiny], delta=1e-5) < 0.1


# ----------------------------------------------------------------- one-step RDP: public API, no dead orders


def test_orders_where_dp_accountings_series_diverges_get_a_finite_upper_bound():
    """dp_accounting reports infinity at fractional orders below 2 for large q (its series does not
    converge); the old code stored that infinity, an order lost to the mechanism forever. The
    quadrature bound is finite there, agrees with Opacus's series, and is never below it."""
    from opacus.accountants.analysis.rdp import compute_rdp

    sigma, q, orders = 1.0, 0.5, (1.25, 1.5, 1.75)
    acc = RdpAccountant(orders=list(orders))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 1)
    assert not np.isfinite(acc.rdp).any()  # the case is real
    ours = accounting.rdp_one_step(sigma, q, orders)
    opacus = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)))
    assert np.isfinite(ours).all()
    assert (ours >= opacus).all() and ours == pytest.approx(opacus, rel=1e-6)
    # and where dp_accounting converges, the integral agrees with it at integer orders
    assert accounting._integral_rdp(1.0, 0.1, 3.0) == pytest.approx(accounting.rdp_one_step(1.0, 0.1, (3.0,))[0], rel=1e-7)


def test_the_one_step_curve_uses_only_dp_accountings_public_accountant(monkeypatch):
    """dpops calls dp_accounting's RdpAccountant (which uses its own helpers), never a private
    helper itself, and loads no module of another library by path. Old code: both."""
    import inspect

    from dp_accounting.rdp import rdp_privacy_accountant as private

    callers = []
    real = private._compute_rdp_poisson_subsampled_gaussian

    def spy(*a, **k):
        callers.append(inspect.stack()[1].frame.f_globals["__name__"])
        return real(*a, **k)

    def refuse(*a, **k):
        raise AssertionError("a module was loaded by path")

    monkeypatch.setattr(private, "_compute_rdp_poisson_subsampled_gaussian", spy)
    monkeypatch.setattr("importlib.util.spec_from_file_location", refuse)
    accounting._rdp_one_step.cache_clear()
    try:
        curve = accounting.rdp_one_step(0.83, 0.0123, filters.FILTER_ORDERS)
    finally:
        accounting._rdp_one_step.cache_clear()
    assert np.isfinite(curve).all() and (curve > 0).all()
    assert callers and all(c.startswith("dp_accounting") for c in callers), callers


# ----------------------------------------------------------------- the ledger: fixed at registration


def _register(ledger: Ledger, f: PrivacyFilter, name: str = "notes", cap: float = 8.0) -> None:
    ledger.register_dataset(name=name, unit="record", delta=1e-5, epsilon_cap=cap, privacy_filter=f)


def _reserve(ledger: Ledger, m: SubsampledGaussian = REF, name: str = "notes"):
    return ledger.reserve(dataset=name, mechanism=m, max_grad_norm=1.0, n_records=10_000, job="j", data_version="sha256:x")


def test_the_ledger_admits_what_the_registered_filter_admits_and_stores_it_in_the_chain(make_ledger, ledger_url):
    f = filters.choose_filter(REF, cap=8.0, delta=1e-5)
    ledger = make_ledger(ledger_url, dataset="notes", delta=1e-5, epsilon_cap=8.0, privacy_filter=f)
    assert ledger.budget("notes").spent == 0.0 and ledger.budget("notes").runs_left is None  # nothing charged yet
    n = 0
    with pytest.raises(BudgetExceededError):
        while True:
            _reserve(ledger)
            n += 1
    assert n == f.runs_left([], REF, delta=1e-5, cap=8.0) >= 13
    b = ledger.budget("notes")
    assert b.privacy_filter == f and b.runs_left == 0 and b.last_mechanism == REF
    assert b.spent == pytest.approx(f.epsilon([REF] * n, delta=1e-5))
    [registered] = [e for e in ledger.history("notes") if e["event"] == "registered"]
    assert registered["payload"]["accountant"] == "rdp-filter-v2"
    assert registered["payload"]["filter"] == {"orders": list(f.orders), "delta_shares": [1.0]}
    assert ledger.verify() == []
    # registering again with another filter changes nothing: the first registration fixed it
    _register(ledger, filters.GRID_FILTER)
    assert ledger.filter_of("notes") == f


def test_an_edited_filter_row_is_caught_and_refuses_admission(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url, dataset="notes", delta=1e-5, epsilon_cap=8.0, privacy_filter=_one_order(4.0))
    _reserve(ledger)
    # the database refuses an UPDATE of a term (migration 0007 extends 0005's trigger) ...
    with pytest.raises(Exception, match="append-only"):
        with ledger.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE datasets SET filter_spec = '{\"delta_shares\":[1.0],\"orders\":[64.0]}'")
    # ... and with the trigger out of the way, verify and admission both name the edit
    tamper(ledger, "UPDATE datasets SET filter_spec = :s", {"s": '{"delta_shares":[1.0],"orders":[64.0]}'})
    assert any("filter_spec" in p and "(edited)" in p for p in ledger.verify())
    with pytest.raises(LedgerError, match="does not verify"):
        _reserve(Ledger(ledger_url, create=False))


def test_a_filter_from_the_config_is_honoured_and_a_different_one_later_refused(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url)
    grid = filters.filter_of_orders([2, 4, 8, 16])
    ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=8.0, privacy_filter=grid, filter_from_config=True)
    assert ledger.filter_of("notes").orders == (2.0, 4.0, 8.0, 16.0)
    with pytest.raises(ConfigError, match="privacy.filter_orders"):
        ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=8.0,
                                privacy_filter=filters.filter_of_orders([5]), filter_from_config=True)


def test_a_bad_filter_in_a_config_names_the_field():
    for orders in ([1.0], [5, 5], [20_000]):
        with pytest.raises(Exception, match="filter_orders"):
            DatasetConfig.model_validate({**_dataset_fields(), "privacy": {"epsilon_cap": 4.0, "delta": 1e-6, "filter_orders": orders}})


def _dataset_fields() -> dict:
    return {"name": "notes", "files": {"train": "t.tsv", "holdout": "h.tsv", "eval": "e.tsv"}, "text_column": "text",
            "label_column": "label", "labels": ["0", "1"], "unit": "record"}


def test_the_plan_chooses_the_filter_a_new_dataset_is_registered_with(make_ledger, ledger_url):
    ds = DatasetConfig.model_validate({**_dataset_fields(), "privacy": {"epsilon_cap": 8.0, "delta": 1e-5}})
    dp = DPSettings(target_epsilon=2.0, max_grad_norm=1.0, expected_batch_size=100, steps=1000)
    p = privacy.plan(dataset=ds, dp=dp, n_records=10_000)
    assert p.filter == filters.choose_filter(SubsampledGaussian(p.noise_multiplier, p.sample_rate, p.steps), cap=8.0, delta=1e-5)
    # a config that names orders wins; a registered dataset's filter wins over both
    named = ds.model_copy(update={"privacy": ds.privacy.model_copy(update={"filter_orders": [3.0, 6.0]})})
    assert privacy.plan(dataset=named, dp=dp, n_records=10_000).filter.orders == (3.0, 6.0)
    ledger = make_ledger(ledger_url, dataset="notes", delta=1e-5, epsilon_cap=8.0, privacy_filter=filters.GRID_FILTER)
    assert privacy.filter_for(ds, p.mechanism, ledger) == filters.GRID_FILTER


# ----------------------------------------------------------------- existing ledgers keep v1


def test_a_v1_ledger_keeps_its_filter_and_its_dead_orders_come_back_on_upgrade(make_ledger, ledger_url):
    """A ledger written before per-dataset filters (schema 0006, curves with the infinities
    dp_accounting reported at non-converging orders) opens at rdp-filter-v1: same orders, same
    even split of delta; the upgrade recomputes the stored curves, which are then finite."""
    from alembic import command
    from alembic.config import Config

    from dpops.ledger.schema import MIGRATIONS

    ledger = make_ledger(ledger_url, dataset="notes", delta=1e-5, epsilon_cap=50.0, privacy_filter=filters.V1_FILTER)
    big_q = SubsampledGaussian(1.0, 0.5, 20)
    _reserve(ledger, big_q)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with ledger.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0006")
    old_curve = [math.inf if a < 2 else x for a, x in zip(filters.FILTER_ORDERS, filters.V1_FILTER.one_step(1.0, 0.5), strict=True)]
    tamper(ledger, "UPDATE spend_totals SET rdp_per_step = :c", {"c": json.dumps(old_curve)})
    ledger.dispose()
    with pytest.raises(LedgerSchemaError, match="revision 0006"):  # opening never migrates
        Ledger(ledger_url)
    ledger_schema.upgrade(Ledger(ledger_url, create=False).engine)  # `dpops ledger upgrade`, to 0007
    upgraded = Ledger(ledger_url)
    assert upgraded.verify() == []
    assert upgraded.filter_of("notes") == filters.V1_FILTER
    b = upgraded.budget("notes")
    assert b.spent == pytest.approx(filters.V1_FILTER.epsilon([big_q], delta=1e-5))
    with upgraded.engine.connect() as conn:
        [stored] = conn.exec_driver_sql("SELECT rdp_per_step FROM spend_totals").scalars().all()
    assert np.isfinite(json.loads(stored)).all()
    _reserve(upgraded, big_q)  # admission goes on under v1
    assert upgraded.verify() == []


def test_dpops_budget_shows_the_filter_and_the_runs_left(make_ledger, workspace_env):
    from typer.testing import CliRunner

    from dpops.cli.app import app
    from dpops.config.workspace import workspace

    workspace_env.mkdir(parents=True)
    f = filters.choose_filter(REF, cap=8.0, delta=1e-5)
    ledger = make_ledger(workspace().ledger_url, dataset="notes", delta=1e-5, epsilon_cap=8.0, privacy_filter=f)
    _reserve(ledger)
    out = CliRunner().invoke(app, ["budget"])
    assert out.exit_code == 0, out.output
    assert f.describe() in out.output and "runs left" in out.output
    left = f.runs_left([REF], REF, delta=1e-5, cap=8.0)
    assert f" {left} " in out.output.splitlines()[1]
    data = json.loads(CliRunner().invoke(app, ["budget", "--json"]).output)
    assert data[0]["runs_left"] == left and data[0]["privacy_filter"]["orders"] == list(f.orders)
