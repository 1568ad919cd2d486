"""The ledger contract, run on SQLite and PostgreSQL alike."""

import multiprocessing as mp

import pytest
from sqlalchemy import text

from dpops import accounting
from dpops.accounting import SubsampledGaussian
from dpops.errors import BudgetExceededError, ConfigError, LedgerError
from dpops.ledger import COMMITTED, FAILED_CHARGED, RELEASED, RUNNING, Ledger

RUN = SubsampledGaussian(1.0, 0.01, 500)
DELTA = 1e-5


def _cap_for(k: int) -> float:
    """A cap that admits exactly k copies of RUN."""
    lo = accounting.filter_epsilon([RUN] * k, delta=DELTA)
    hi = accounting.filter_epsilon([RUN] * (k + 1), delta=DELTA)
    return (lo + hi) / 2


def _ledger(url: str, k: int = 3) -> Ledger:
    ledger = Ledger(url)
    ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=_cap_for(k))
    return ledger


def _reserve(ledger: Ledger, mech=RUN):
    return ledger.reserve(dataset="notes", mechanism=mech, max_grad_norm=1.0, n_records=10_000, job="j", data_version="sha256:x")


def test_admits_until_cap_then_refuses_naming_dataset_spent_requested_cap(ledger_url):
    ledger = _ledger(ledger_url, k=3)
    for _ in range(3):
        _reserve(ledger)
    before = ledger.budget("notes")
    with pytest.raises(BudgetExceededError) as err:
        _reserve(ledger)
    msg = str(err.value)
    assert "'notes'" in msg and "spent" in msg and "requests" in msg and "cap" in msg
    after = ledger.budget("notes")
    assert after.charges == before.charges == {"reserved": 3}
    assert after.spent == pytest.approx(accounting.filter_epsilon([RUN] * 3, delta=DELTA))


def test_spent_is_recomputed_by_composition_not_summed(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    for _ in range(2):
        _reserve(ledger)
    b = ledger.budget("notes")
    assert b.spent == pytest.approx(accounting.filter_epsilon([RUN, RUN], delta=DELTA))
    assert b.spent < 2 * accounting.filter_epsilon([RUN], delta=DELTA)


def test_state_machine_and_what_is_charged(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    released = _reserve(ledger)
    ledger.release(released.id, reason="job cancelled before start")
    assert ledger.charge(released.id).state == RELEASED

    committed = _reserve(ledger)
    ledger.start(committed.id)
    with pytest.raises(LedgerError, match="never released"):
        ledger.release(committed.id, reason="oops")
    ledger.commit(committed.id, steps_run=200)
    assert ledger.charge(committed.id).state == COMMITTED

    failed = _reserve(ledger)
    ledger.start(failed.id)
    ledger.fail(failed.id, reason="worker died")
    assert ledger.charge(failed.id).state == FAILED_CHARGED

    expected = accounting.filter_epsilon([SubsampledGaussian(1.0, 0.01, 200), RUN], delta=DELTA)
    assert ledger.budget("notes").spent == pytest.approx(expected)


def test_illegal_transitions_are_refused(ledger_url):
    ledger = _ledger(ledger_url)
    c = _reserve(ledger)
    with pytest.raises(LedgerError):
        ledger.commit(c.id, steps_run=10)  # not running yet
    ledger.start(c.id)
    assert ledger.charge(c.id).state == RUNNING
    with pytest.raises(LedgerError, match="steps_run"):
        ledger.commit(c.id, steps_run=RUN.steps + 1)
    ledger.commit(c.id, steps_run=RUN.steps)
    with pytest.raises(LedgerError):
        ledger.fail(c.id, reason="too late")


def test_registration_cannot_silently_change_the_cap(ledger_url):
    ledger = _ledger(ledger_url)
    ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=_cap_for(3))  # same terms: fine
    with pytest.raises(ConfigError, match="epsilon_cap"):
        ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=1000.0)


def test_delta_must_be_below_one_over_n(ledger_url):
    ledger = _ledger(ledger_url)
    with pytest.raises(ConfigError, match="1/n"):
        ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=100_000, job="j", data_version="v")


def test_verify_passes_then_detects_edit_delete_and_truncation(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    a = _reserve(ledger)
    ledger.start(a.id)
    ledger.commit(a.id, steps_run=100)
    _reserve(ledger)
    assert ledger.verify() == []

    with ledger.engine.begin() as conn:  # edit a charge row in place
        conn.execute(text("UPDATE charges SET noise_multiplier = 5.0 WHERE id = :id"), {"id": a.id})
    assert any("edited" in p for p in ledger.verify())
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE charges SET noise_multiplier = 1.0 WHERE id = :id"), {"id": a.id})
    assert ledger.verify() == []

    with ledger.engine.begin() as conn:  # edit an event's payload
        conn.execute(text("UPDATE events SET payload = '{\"steps_run\": 1}' WHERE kind = 'committed'"))
    assert any("edited" in p for p in ledger.verify())


def test_verify_detects_deleted_event(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    a = _reserve(ledger)
    ledger.start(a.id)
    ledger.commit(a.id, steps_run=100)
    with ledger.engine.begin() as conn:
        conn.execute(text("DELETE FROM events WHERE kind = 'running'"))
    problems = ledger.verify()
    assert any("deleted or reordered" in p or "does not link" in p for p in problems)


def _worker(url: str, barrier, out) -> None:
    ledger = Ledger(url, create=False)
    barrier.wait()
    try:
        _reserve(ledger)
        out.put("granted")
    except BudgetExceededError:
        out.put("refused")
    finally:
        ledger.dispose()


@pytest.mark.slow
def test_concurrent_processes_never_overspend(ledger_url):
    k, clients = 3, 8
    _ledger(ledger_url, k=k).dispose()
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(ledger_url, barrier, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = sorted(out.get(timeout=5) for _ in procs)
    assert results.count("granted") == k, results
    assert Ledger(ledger_url, create=False).budget("notes").charges == {"reserved": k}
