"""The tamper matrix: direct edits of the ledger's database that `verify` must report.

Every edit goes through :func:`tests.helpers.tamper`. Where a case forges an event, the chain is
rehashed consistently afterwards (:func:`tests.helpers.rehash_chain`), so that what catches it is
verify's replay of what the events say, not a hash mismatch. Runs on SQLite and PostgreSQL.
"""

import json

import pytest
from sqlalchemy import event, text
from typer.testing import CliRunner

from dpops.ledger.chain import CURVE_DRIFT_RTOL
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


def _reserve(ledger: Ledger, dataset: str = "notes", blocks=None, mech=RUN):
    return ledger.reserve(dataset=dataset, mechanism=mech, max_grad_norm=1.0, n_records=10_000, job="j",
                          data_version="sha256:x", blocks=blocks)


def _running(ledger: Ledger, dataset: str = "notes"):
    c = _reserve(ledger, dataset)
    ledger.start(c.id)
    return c


def _reported(problems: list[str], dataset: str, *words: str) -> bool:
    """Some problem names the dataset and every one of ``words``."""
    return any(f"dataset {dataset!r}" in p and all(w in p for w in words) for p in problems)


def _no_hash_problem(problems: list[str]) -> bool:
    return not any("hash" in p or "link" in p or "chain head" in p for p in problems)


# ----------------------------------------------------------------- terms of datasets and blocks (T9, T10, T11)


@pytest.mark.parametrize("column, value", [("epsilon_cap", 100.0), ("delta", 1e-2)], ids=["T9-cap", "T10-delta"])
def test_an_edited_dataset_term_is_reported(ledger_url, column, value):
    ledger = _ledger(ledger_url)
    _reserve(ledger)
    assert ledger.verify() == []
    tamper(ledger, f"UPDATE datasets SET {column} = :v WHERE name = 'notes'", {"v": value})
    problems = ledger.verify()
    assert _reported(problems, "notes", column, repr(value), "registered event", "edited"), problems


def test_T11_an_edited_block_cap_is_reported(ledger_url):
    ledger = _ledger(ledger_url)
    ledger.add_block("notes", name="2026-09", n_records=10_000, epsilon_cap=4.0)
    assert ledger.verify() == []
    tamper(ledger, "UPDATE blocks SET epsilon_cap = 12 WHERE name = '2026-09'")
    problems = ledger.verify()
    assert _reported(problems, "notes", "block '2026-09'", "epsilon_cap", "12.0", "edited"), problems


@pytest.mark.parametrize("edit", ["row without event", "event without row"])
def test_a_block_row_and_its_event_must_match(ledger_url, edit):
    ledger = _ledger(ledger_url)
    ledger.add_block("notes", name="2026-09", n_records=10_000)
    if edit == "row without event":
        tamper(ledger, "INSERT INTO blocks (dataset_id, name, epsilon_cap, n_records, created_at) "
                       "SELECT id, 'forged', 14.0, 5, '2026' FROM datasets WHERE name = 'notes'")
        assert _reported(ledger.verify(), "notes", "block 'forged'", "no block_added event")
    else:
        tamper(ledger, "DELETE FROM blocks WHERE name = '2026-09'")
        assert _reported(ledger.verify(), "notes", "block '2026-09'", "no row", "deleted")


# ----------------------------------------------------------------- the state machine (T20 and forged steps)


def test_T20_a_forged_running_to_released_event_with_valid_hashes_is_tampering(ledger_url):
    """A release of a charge that read data, with the index made to match and every hash recomputed."""
    ledger = _ledger(ledger_url)
    c = _running(ledger)
    spent = ledger.budget("notes").spent
    forge_event(ledger, "notes", "released", c.id, {"reason": "forged"})
    tamper(ledger, "UPDATE charge_states SET state = 'released', steps_counted = 0 WHERE charge_id = :c", {"c": c.id})
    tamper(ledger, "UPDATE spend_totals SET steps = 0")
    assert ledger.budget("notes").spent < spent  # what admission now sees: the charge's spend is gone
    problems = ledger.verify()
    assert _no_hash_problem(problems), problems  # caught by the state machine, not by a hash
    assert _reported(problems, "notes", c.id, "illegal transition 'running' -> 'released'", "tampering"), problems
    # the replay does not apply the illegal event: the charge still counts in full
    assert _reported(problems, "notes", c.id, "state index says state 'released'", "'running'")
    assert _reported(problems, "notes", "spend total", "the charges give 500")


def _forge_case(ledger, case):
    """Forge the case's events on a fresh charge; return the charge id and what the problem must say."""
    if case == "progress while reserved":
        c = _reserve(ledger)
        forge_event(ledger, "notes", "progress", c.id, {"steps_done": 10})
        return c.id, "'progress' event while the charge is 'reserved'"
    if case == "second finished":
        c = _running(ledger)
        ledger.record_finished(c.id, steps_run=100)
        forge_event(ledger, "notes", "finished", c.id, {"steps_run": 50})
        return c.id, "after the trainer's finished result"
    if case == "commit below planned without finished":
        c = _running(ledger)
        forge_event(ledger, "notes", "committed", c.id, {"steps_run": 1})
        return c.id, "committed at 1 of 500"
    if case == "commit below progress":
        c = _running(ledger)
        ledger.record_progress(c.id, steps_done=300)
        forge_event(ledger, "notes", "finished", c.id, {"steps_run": 200})
        return c.id, "'finished' steps_run 200 is outside [300, 500]"
    if case == "early expiry":
        c = _reserve(ledger)
        forge_event(ledger, "notes", "expired", c.id, {"reason": "forged"})
        return c.id, "before its lease ran out"
    if case == "first event not reserved":
        forge_event(ledger, "notes", "running", "no-such-charge", {})
        return "no-such-charge", "first event is 'running'"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["progress while reserved", "second finished", "commit below planned without finished",
                                  "commit below progress", "early expiry", "first event not reserved"])
def test_forged_events_that_break_the_state_machine_are_tampering(ledger_url, case):
    ledger = _ledger(ledger_url)
    charge_id, says = _forge_case(ledger, case)
    problems = ledger.verify()
    assert _no_hash_problem(problems), problems
    assert _reported(problems, "notes", f"charge {charge_id}", "breaks the state machine", says), problems


# ----------------------------------------------------------------- derived columns (T23 and the index)


def test_T23_an_extended_lease_in_the_state_index_is_reported(ledger_url):
    ledger = _ledger(ledger_url)
    c = _reserve(ledger)
    tamper(ledger, "UPDATE charge_states SET lease_expires_at = '2999-01-01T00:00:00.000000+00:00' WHERE charge_id = :c",
           {"c": c.id})
    problems = ledger.verify()
    assert _reported(problems, "notes", c.id, "lease_expires_at", "2999-01-01", "edited"), problems


@pytest.mark.parametrize("edit, says", [
    ("UPDATE charge_states SET state = 'released' WHERE charge_id = :c", "state 'released'"),
    ("UPDATE charge_states SET steps_counted = 1 WHERE charge_id = :c", "steps_counted 1"),
    ("UPDATE charge_states SET dataset_id = (SELECT id FROM datasets WHERE name = 'other') WHERE charge_id = :c", "dataset_id"),
    ("DELETE FROM charge_states WHERE charge_id = :c", "no state index row"),
    ("UPDATE spend_totals SET steps = steps - 100 WHERE dataset_id = (SELECT id FROM datasets WHERE name = 'notes')",
     "spend total for scope '(whole dataset)'"),
], ids=["state", "steps_counted", "dataset_id", "deleted-row", "spend-total"])
def test_an_edited_spend_index_is_reported(ledger_url, edit, says):
    ledger = _ledger(ledger_url)
    ledger.register_dataset(name="other", unit="record", delta=DELTA, epsilon_cap=14.0)
    c = _running(ledger)
    assert ledger.verify() == []
    tamper(ledger, edit, {"c": c.id})
    problems = ledger.verify()
    assert _reported(problems, "notes", says, "edited" if "DELETE" not in edit else "deleted"), problems


# ----------------------------------------------------------------- invariants of the chain


def test_a_consistently_forged_block_above_the_dataset_cap_is_reported(ledger_url):
    ledger = _ledger(ledger_url)
    tamper(ledger, "INSERT INTO blocks (dataset_id, name, epsilon_cap, n_records, created_at) "
                   "SELECT id, 'big', 100.0, 5, '2026' FROM datasets WHERE name = 'notes'")
    forge_event(ledger, "notes", "block_added", None, {"block": "big", "epsilon_cap": 100.0, "n_records": 5})
    problems = ledger.verify()
    assert _no_hash_problem(problems), problems
    assert _reported(problems, "notes", "block 'big'", "above the dataset's cap 14.0"), problems


def test_a_block_forged_after_whole_dataset_spend_is_reported(ledger_url):
    ledger = _ledger(ledger_url)
    c = _reserve(ledger)  # counts against the whole dataset
    tamper(ledger, "INSERT INTO blocks (dataset_id, name, epsilon_cap, n_records, created_at) "
                   "SELECT id, 'late', 14.0, 5, '2026' FROM datasets WHERE name = 'notes'")
    forge_event(ledger, "notes", "block_added", None, {"block": "late", "epsilon_cap": 14.0, "n_records": 5})
    problems = ledger.verify()
    assert _no_hash_problem(problems), problems
    assert _reported(problems, "notes", "block 'late'", c.id, "cannot be partitioned"), problems


def test_a_filter_the_code_does_not_implement_is_reported(ledger_url):
    ledger = _ledger(ledger_url)
    tamper(ledger, "UPDATE datasets SET accountant = 'rdp-filter-v0' WHERE name = 'notes'")
    tamper(ledger, "UPDATE events SET payload = REPLACE(payload, :a, 'rdp-filter-v0') WHERE kind = 'registered'",
           {"a": filters.FILTER_NAME})
    rehash_chain(ledger, "notes")
    problems = ledger.verify()
    assert _no_hash_problem(problems), problems
    assert _reported(problems, "notes", "'rdp-filter-v0'", "does not implement"), problems


# ----------------------------------------------------------------- honest ledgers


def test_blocks_registered_in_non_alphabetical_order_verify(ledger_url):
    """A charge reading "jan" then "feb" (id order is not name order) is not an edit."""
    ledger = _ledger(ledger_url)
    for month in ("jan", "feb"):
        ledger.add_block("notes", name=month, n_records=10_000)
    c = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=20_000, job="j",
                       data_version="v", blocks=["jan", "feb"])
    ledger.start(c.id)
    assert ledger.verify() == []


def test_verify_issues_the_same_queries_whatever_the_number_of_charges(ledger_url):
    """One pass over each dataset's events: no query per charge."""
    ledger = _ledger(ledger_url)
    statements: list[str] = []
    event.listen(ledger.engine, "before_cursor_execute", lambda *args: statements.append(args[2]))

    def count() -> int:
        statements.clear()
        assert ledger.verify() == []
        return len(statements)

    _running(ledger)
    few = count()
    for _ in range(10):
        _running(ledger)
    assert count() == few


# ----------------------------------------------------------------- drift vs edit


def _scale_curve(ledger: Ledger, factor: float) -> None:
    with ledger.engine.connect() as conn:
        row_id, curve = conn.execute(text("SELECT id, rdp_per_step FROM spend_totals")).one()
    tamper(ledger, "UPDATE spend_totals SET rdp_per_step = :c WHERE id = :i",
           {"c": json.dumps([x * factor for x in json.loads(curve)]), "i": row_id})


def test_a_curve_moved_in_its_last_digits_is_drift_not_an_edit(ledger_url, workspace_env, monkeypatch):
    ledger = _ledger(ledger_url)
    _reserve(ledger)
    _scale_curve(ledger, 1 - CURVE_DRIFT_RTOL / 100)
    report = ledger.verify_report()
    assert report.problems == () and ledger.verify() == []
    assert len(report.drift) == 1 and "drift" in report.drift[0] and "dataset 'notes'" in report.drift[0]
    assert "lower at 24 of 24 orders" in report.drift[0]

    from dpops.cli.app import app

    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    result = CliRunner().invoke(app, ["ledger", "verify"])
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "never adopted" in result.output and "ledger verifies" in result.output


def test_a_curve_lowered_beyond_drift_is_an_edit(ledger_url, monkeypatch):
    ledger = _ledger(ledger_url)
    _reserve(ledger)
    _scale_curve(ledger, 1 - 1e-6)
    report = ledger.verify_report()
    assert report.drift == ()
    assert _reported(list(report.problems), "notes", "stored RDP curve", "relative difference", "edited"), report

    from dpops.cli.app import app

    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    result = CliRunner().invoke(app, ["ledger", "verify"])
    assert result.exit_code == 1 and "stored RDP curve" in result.output
