"""Admission checks what it reads against the record, on SQLite and PostgreSQL.

`reserve` (and `add_block`) read derived rows: the dataset's and blocks' terms and the spend index.
Each case here edits those rows directly (:func:`tests.helpers.tamper`), as the tamper matrix does,
and checks that the next admission is refused instead of admitting on the edited figure.
"""

import multiprocessing as mp

import pytest

from dpops.errors import LedgerError
from dpops.ledger.store import Ledger
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian
from tests.helpers import forge_event, rehash_chain, tamper

RUN = SubsampledGaussian(1.0, 0.01, 500)
DELTA = 1e-5


def _ledger(url: str) -> Ledger:
    ledger = Ledger(url)
    ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=14.0)
    return ledger


def _reserve(ledger: Ledger, blocks=None, n_records: int = 10_000):
    return ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=n_records, job="j",
                          data_version="sha256:x", blocks=blocks)


def _running(ledger: Ledger):
    c = _reserve(ledger)
    ledger.start(c.id)
    return c


def _refused(ledger: Ledger, *words: str, blocks=None) -> None:
    """The next reserve is refused as a ledger that does not verify, naming ``words``; nothing is written."""
    before = len(list(ledger.history("notes")))
    with pytest.raises(LedgerError, match="ledger 'notes' does not verify") as info:
        _reserve(ledger, blocks=blocks)
    assert "dpops ledger verify" in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert len(list(ledger.history("notes"))) == before


@pytest.mark.parametrize("edit, says", [
    ("UPDATE charge_states SET state = 'released' WHERE charge_id = :c", "state 'released'"),
    ("UPDATE charge_states SET steps_counted = 1 WHERE charge_id = :c", "steps_counted 1"),
    ("UPDATE charge_states SET dataset_id = (SELECT id FROM datasets WHERE name = 'other') WHERE charge_id = :c",
     "no state index row"),
    ("DELETE FROM charge_states WHERE charge_id = :c", "no state index row"),
    ("UPDATE spend_totals SET steps = steps - 100 WHERE dataset_id = (SELECT id FROM datasets WHERE name = 'notes')",
     "spend total"),
], ids=["state", "steps_counted", "dataset_id", "deleted-row", "spend-total"])
def test_an_edited_spend_index_refuses_the_next_admission(ledger_url, edit, says):
    ledger = _ledger(ledger_url)
    ledger.register_dataset(name="other", unit="record", delta=DELTA, epsilon_cap=14.0)
    c = _running(ledger)  # this admission verified the chain and cached it
    tamper(ledger, edit, {"c": c.id})
    _refused(ledger, says)
    _refused(Ledger(ledger_url, create=False), says)  # a fresh process, nothing cached, refuses too


@pytest.mark.parametrize("column, value", [("epsilon_cap", 100.0), ("delta", 5e-5)], ids=["cap", "delta"])
def test_an_edited_dataset_term_refuses_the_next_admission(ledger_url, column, value):
    """A higher cap, or a larger delta (a lower epsilon for the same spend), would admit more."""
    ledger = _ledger(ledger_url)
    _reserve(ledger)
    tamper(ledger, f"UPDATE datasets SET {column} = :v WHERE name = 'notes'", {"v": value})
    _refused(ledger, column, "registered event")
    with pytest.raises(LedgerError, match="does not verify"):
        ledger.add_block("notes", name="late", n_records=10)


def test_an_edited_block_cap_refuses_admission_on_it(ledger_url):
    ledger = _ledger(ledger_url)
    ledger.add_block("notes", name="2026-09", n_records=10_000, epsilon_cap=4.0)
    tamper(ledger, "UPDATE blocks SET epsilon_cap = 12 WHERE name = '2026-09'")
    _refused(ledger, "block '2026-09'", "epsilon_cap", blocks=["2026-09"])


def test_a_chain_rewritten_after_admission_verified_it_is_refused(ledger_url):
    """The cached prefix is keyed by its head (seq, hash): a consistent rewrite of an old event
    (the cap raised in the registered event and the row alike, every hash recomputed) moves it."""
    ledger = _ledger(ledger_url)
    _reserve(ledger)
    tamper(ledger, "UPDATE datasets SET epsilon_cap = 100.0 WHERE name = 'notes'")
    tamper(ledger, "UPDATE events SET payload = REPLACE(payload, :a, :b) WHERE kind = 'registered'",
           {"a": '"epsilon_cap":14.0', "b": '"epsilon_cap":100.0'})
    rehash_chain(ledger, "notes")
    assert ledger.verify() == []  # a consistent rewrite of history: only a copy held elsewhere tells
    _refused(ledger)  # the rewritten events no longer link to the prefix it verified


def test_a_forged_event_appended_after_admission_verified_the_chain_is_refused(ledger_url):
    ledger = _ledger(ledger_url)
    c = _running(ledger)
    forge_event(ledger, "notes", "released", c.id, {"reason": "forged"})
    tamper(ledger, "UPDATE charge_states SET state = 'released', steps_counted = 0 WHERE charge_id = :c", {"c": c.id})
    tamper(ledger, "UPDATE spend_totals SET steps = 0")
    _refused(ledger, "illegal transition 'running' -> 'released'")


def test_an_honest_ledger_admits_and_verifies_after_many_admissions(ledger_url):
    ledger = _ledger(ledger_url)
    other = Ledger(ledger_url, create=False)  # a second client: its cache falls behind, then catches up
    for i in range(4):
        c = _reserve(ledger if i % 2 else other)
        if i % 2:
            ledger.start(c.id)
            ledger.commit(c.id, steps_run=RUN.steps)
        else:
            other.release(c.id, reason="not needed")
    assert ledger.verify() == []
    assert ledger.budget("notes").charges == {"committed": 2, "released": 2}


@pytest.mark.parametrize("where", ["row and event", "row only"])
def test_a_filter_the_code_does_not_implement_refuses_admission(ledger_url, where):
    ledger = _ledger(ledger_url)
    tamper(ledger, "UPDATE datasets SET accountant = 'rdp-filter-v0' WHERE name = 'notes'")
    if where == "row and event":  # as a ledger written by another version of the code would be
        tamper(ledger, "UPDATE events SET payload = REPLACE(payload, :a, 'rdp-filter-v0') WHERE kind = 'registered'",
               {"a": filters.FILTER_NAME})
        rehash_chain(ledger, "notes")
    with pytest.raises(LedgerError, match="privacy filter 'rdp-filter-v0', which this code does not implement"):
        _reserve(Ledger(ledger_url, create=False))
    assert any("'rdp-filter-v0'" in p for p in ledger.verify())


# ----------------------------------------------------------------- concurrent registration


def _register(url: str, barrier, out) -> None:
    ledger = Ledger(url, create=False)
    barrier.wait()
    try:
        ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=14.0)
        out.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        out.put(f"{type(exc).__name__}: {exc}")
    finally:
        ledger.dispose()


def test_eight_processes_registering_one_dataset_at_once_all_succeed(ledger_url):
    Ledger(ledger_url).dispose()  # the schema exists before the race
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_register, args=(ledger_url, barrier, out)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * 8, results
    ledger = Ledger(ledger_url, create=False)
    assert [e["event"] for e in ledger.history("notes")] == ["registered"]
    assert ledger.verify() == []
