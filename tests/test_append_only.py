"""The database itself refuses to rewrite the ledger's record (migration 0005)."""

import pytest
from sqlalchemy import exc, text

from dpops.ledger.store import Ledger
from dpops.privacy.accounting import SubsampledGaussian

RUN = SubsampledGaussian(1.0, 0.01, 100)

REFUSED = [
    "UPDATE events SET payload = '{}'",
    "DELETE FROM events",
    "UPDATE charges SET noise_multiplier = 5.0",
    "DELETE FROM charges",
    "DELETE FROM charge_blocks",
    "UPDATE charge_blocks SET block_id = block_id",
    "UPDATE blocks SET epsilon_cap = 100.0",
    "DELETE FROM blocks",
    "UPDATE datasets SET epsilon_cap = 100.0",
    "UPDATE datasets SET delta = 0.01",
    "DELETE FROM datasets",
]


def _cycle(ledger: Ledger) -> None:
    ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=50.0)
    ledger.add_block("notes", name="jan", n_records=10_000)
    c = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                       blocks=["jan"])
    ledger.start(c.id)
    ledger.record_finished(c.id, steps_run=100)
    ledger.commit(c.id, steps_run=100)


@pytest.mark.parametrize("statement", REFUSED)
def test_the_database_refuses_to_rewrite_the_record(make_ledger, ledger_url, statement):
    """Fails on the old code (no triggers: every statement goes through)."""
    ledger = make_ledger(ledger_url)
    _cycle(ledger)
    with pytest.raises(exc.DatabaseError, match="append-only"):
        with ledger.engine.begin() as conn:
            conn.execute(text(statement))
    c = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                       blocks=["jan"])  # and the ledger keeps working
    ledger.release(c.id, reason="test")
    assert ledger.budget("notes").spent > 0
    assert ledger.verify() == []


def test_truncate_is_refused_on_postgresql(pg_database):
    ledger = Ledger(pg_database)
    for table in ("events", "charges", "charge_blocks", "blocks", "datasets"):
        with pytest.raises(exc.DatabaseError, match="append-only"):
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql(f"TRUNCATE {table} CASCADE")
