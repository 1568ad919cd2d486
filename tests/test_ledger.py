"""The ledger contract, run on SQLite and PostgreSQL alike."""

import multiprocessing as mp

import pytest
from sqlalchemy import text

from dpops.errors import BudgetExceededError, ConfigError, LedgerError, LedgerSchemaError
from dpops.ledger import schema as ledger_schema
from dpops.ledger.states import COMMITTED, FAILED_CHARGED, RELEASED, RUNNING
from dpops.ledger.store import Ledger
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian
from tests.helpers import tamper

RUN = SubsampledGaussian(1.0, 0.01, 500)
DELTA = 1e-5


def _cap_for(k: int) -> float:
    """A cap that admits exactly k copies of RUN."""
    lo = filters.filter_epsilon([RUN] * k, delta=DELTA)
    hi = filters.filter_epsilon([RUN] * (k + 1), delta=DELTA)
    return (lo + hi) / 2


def _ledger(url: str, k: int = 3, privacy_filter=filters.GRID_FILTER) -> Ledger:
    ledger = Ledger(url)
    ledger.register_dataset(name="notes", unit="record", delta=DELTA, epsilon_cap=_cap_for(k), privacy_filter=privacy_filter)
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
    assert after.spent == pytest.approx(filters.filter_epsilon([RUN] * 3, delta=DELTA))


def test_spent_is_recomputed_by_composition_not_summed(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    for _ in range(2):
        _reserve(ledger)
    b = ledger.budget("notes")
    assert b.spent == pytest.approx(filters.filter_epsilon([RUN, RUN], delta=DELTA))
    assert b.spent < 2 * filters.filter_epsilon([RUN], delta=DELTA)


def test_state_machine_and_what_is_charged(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    released = _reserve(ledger)
    ledger.release(released.id, reason="job cancelled before start")
    assert ledger.charge(released.id).state == RELEASED

    committed = _reserve(ledger)
    ledger.start(committed.id)
    with pytest.raises(LedgerError, match="never released"):
        ledger.release(committed.id, reason="oops")
    ledger.record_finished(committed.id, steps_run=200)  # the trainer's completed result
    ledger.commit(committed.id, steps_run=200)
    assert ledger.charge(committed.id).state == COMMITTED

    failed = _reserve(ledger)
    ledger.start(failed.id)
    ledger.fail(failed.id, reason="worker died")
    assert ledger.charge(failed.id).state == FAILED_CHARGED

    expected = filters.filter_epsilon([SubsampledGaussian(1.0, 0.01, 200), RUN], delta=DELTA)
    assert ledger.budget("notes").spent == pytest.approx(expected)


def test_progress_is_recorded_durably_and_changes_no_figure(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    charge = _reserve(ledger)
    with pytest.raises(LedgerError, match="only while running"):
        ledger.record_progress(charge.id, steps_done=10)  # no data read yet
    ledger.start(charge.id)
    before = ledger.budget("notes").spent
    for done in (10, 20, 20, 30):
        ledger.record_progress(charge.id, steps_done=done)
    assert ledger.progress(charge.id) == 30
    assert ledger.budget("notes").spent == before  # a running charge counts its reserved steps
    with pytest.raises(LedgerError, match=r"in \[30, 500\]"):
        ledger.record_progress(charge.id, steps_done=29)  # progress never goes back
    with pytest.raises(LedgerError, match=r"in \[30, 500\]"):
        ledger.record_progress(charge.id, steps_done=501)
    with pytest.raises(LedgerError, match="below the 30 steps"):
        ledger.commit(charge.id, steps_run=25)
    ledger.fail(charge.id, reason="worker died at step 31")
    assert ledger.budget("notes").spent == before  # died after reading data: charged in full
    with pytest.raises(LedgerError, match="only while running"):
        ledger.record_progress(charge.id, steps_done=40)
    events = [e for e in ledger.history("notes") if e["charge"] == charge.id]
    assert [e["payload"]["steps_done"] for e in events if e["event"] == "progress"] == [10, 20, 20, 30]
    assert ledger.charge(charge.id).state == FAILED_CHARGED
    assert ledger.verify() == []


def test_commit_below_the_reserved_steps_needs_the_trainers_completed_result(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    c = _reserve(ledger)
    with pytest.raises(LedgerError, match="only while running"):
        ledger.record_finished(c.id, steps_run=10)  # never trained
    ledger.start(c.id)
    ledger.record_progress(c.id, steps_done=200)  # recorded before steps 1..200
    with pytest.raises(LedgerError, match="recorded none"):
        ledger.commit(c.id, steps_run=200)  # whoever settles a run that did not finish cannot claim fewer steps
    with pytest.raises(LedgerError, match=r"in \[200, 500\]"):
        ledger.record_finished(c.id, steps_run=150)  # never below the recorded progress
    ledger.record_finished(c.id, steps_run=200)
    for again in (lambda: ledger.record_finished(c.id, steps_run=200), lambda: ledger.record_progress(c.id, steps_done=300)):
        with pytest.raises(LedgerError, match="already finished"):
            again()
    with pytest.raises(LedgerError, match="below the 200 steps its progress"):
        ledger.commit(c.id, steps_run=150)
    with pytest.raises(LedgerError, match="it ran 200"):
        ledger.commit(c.id, steps_run=250)
    ledger.commit(c.id, steps_run=200)
    assert ledger.charge(c.id).steps_run == 200
    full = _reserve(ledger)
    ledger.start(full.id)
    ledger.record_progress(full.id, steps_done=10)
    ledger.commit(full.id, steps_run=RUN.steps)  # the reserved steps need no completed result: charged in full
    events = [e["event"] for e in ledger.history("notes") if e["charge"] == c.id]
    assert events == ["reserved", "running", "progress", "finished", "committed"]
    assert ledger.verify() == []


def test_commit_reads_the_progress_under_the_dataset_lock(ledger_url):
    """A progress event written while a commit waits for the dataset's lock is seen by that commit."""
    import threading
    import time

    from dpops.ledger.states import PROGRESS

    ledger = _ledger(ledger_url, k=5)
    c = _reserve(ledger)
    ledger.start(c.id)
    ledger.record_progress(c.id, steps_done=100)
    ledger.record_finished(c.id, steps_run=100)
    outcome = []

    def settle():
        try:
            ledger.commit(c.id, steps_run=100)
            outcome.append("committed")
        except LedgerError as exc:
            outcome.append(str(exc))

    with ledger.engine.begin() as conn:  # another writer holds the lock, and appends a progress event beyond 100
        ds = ledger._lock_dataset(conn, "notes")
        waiting = threading.Thread(target=settle)
        waiting.start()
        time.sleep(1.0)  # the commit has started and waits for the lock
        ledger._append(conn, ds, PROGRESS, c.id, {"steps_done": 300})
    waiting.join(timeout=60)
    assert len(outcome) == 1 and "below the 300 steps" in outcome[0], outcome
    assert ledger.charge(c.id).state == RUNNING


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
    ledger.record_finished(a.id, steps_run=100)
    ledger.commit(a.id, steps_run=100)
    _reserve(ledger)
    assert ledger.verify() == []

    tamper(ledger, "UPDATE charges SET noise_multiplier = 5.0 WHERE id = :id", {"id": a.id})  # edit a charge row in place
    assert any("edited" in p for p in ledger.verify())
    tamper(ledger, "UPDATE charges SET noise_multiplier = 1.0 WHERE id = :id", {"id": a.id})
    assert ledger.verify() == []

    tamper(ledger, "UPDATE events SET payload = '{\"steps_run\": 1}' WHERE kind = 'committed'")  # edit an event's payload
    assert any("edited" in p for p in ledger.verify())


def test_verify_detects_reordered_events(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    a = _reserve(ledger)
    ledger.start(a.id)
    for swap in ("UPDATE events SET seq = -1 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
                 "UPDATE events SET seq = 3 WHERE seq = -1"):  # swap the seq numbers of two events
        tamper(ledger, swap)
    assert any("link" in p or "edited" in p for p in ledger.verify())


def test_reservation_expires_after_its_lease_and_then_counts_nothing(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url, lease_seconds=0.0, dataset="notes", unit="record", delta=DELTA, epsilon_cap=_cap_for(1))
    stale = _reserve(ledger)
    fresh_ledger = Ledger(ledger_url, create=False)  # default lease
    fresh = _reserve(fresh_ledger)  # admitted only because the stale one expired
    assert ledger.charge(stale.id).state == "expired"
    with pytest.raises(LedgerError, match="expired"):
        ledger.start(stale.id)
    fresh_ledger.start(fresh.id)
    assert ledger.budget("notes").charges == {"expired": 1, "running": 1}
    assert ledger.verify() == []


def test_killed_run_stays_charged_in_full(ledger_url, tmp_path):
    """A process SIGKILLed after `running` was written leaves its charge counting in full."""
    import subprocess
    import sys

    _ledger(ledger_url, k=5).dispose()
    script = (
        "import os, signal, sys\n"
        "from dpops.privacy.accounting import SubsampledGaussian\n"
        "from dpops.ledger import Ledger\n"
        "l = Ledger(sys.argv[1], create=False)\n"
        "c = l.reserve(dataset='notes', mechanism=SubsampledGaussian(1.0, 0.01, 500), max_grad_norm=1.0,"
        " n_records=10000, job='j', data_version='v')\n"
        "l.start(c.id)\n"
        "print(c.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, ledger_url], capture_output=True, text=True)
    assert proc.returncode == -9
    charge_id = proc.stdout.strip()
    ledger = Ledger(ledger_url, create=False)
    assert ledger.charge(charge_id).state == RUNNING
    assert ledger.budget("notes").spent == pytest.approx(filters.filter_epsilon([RUN], delta=DELTA))
    with pytest.raises(LedgerError):
        ledger.release(charge_id, reason="it died")


def test_postgres_columns_are_double_precision(pg_database):
    ledger = Ledger(pg_database)
    with ledger.engine.connect() as conn:
        types = dict(conn.execute(text(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name IN ('datasets', 'charges') AND column_name IN "
            "('delta', 'epsilon_cap', 'noise_multiplier', 'sample_rate', 'max_grad_norm')"
        )).all())
    assert set(types.values()) == {"double precision"}, types


def test_user_unit_needs_a_contribution_bound(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url)
    with pytest.raises(ConfigError, match="contribution_bound"):
        ledger.register_dataset(name="visits", unit="user", delta=DELTA, epsilon_cap=3.0)
    ledger.register_dataset(name="visits", unit="user", delta=DELTA, epsilon_cap=3.0, contribution_bound=5)
    assert ledger.budget("visits").unit == "user"


def test_verify_detects_deleted_event(ledger_url):
    ledger = _ledger(ledger_url, k=5)
    a = _reserve(ledger)
    ledger.start(a.id)
    ledger.record_finished(a.id, steps_run=100)
    ledger.commit(a.id, steps_run=100)
    tamper(ledger, "DELETE FROM events WHERE kind = 'running'")
    problems = ledger.verify()
    assert any("deleted or reordered" in p or "does not link" in p for p in problems)


def _safe_worker(url: str, barrier, out) -> None:
    ledger = Ledger(url, create=False)
    barrier.wait()
    try:
        _reserve(ledger)
        out.put("granted")
    except BudgetExceededError:
        out.put("refused")
    except Exception as exc:  # reported, so the test fails with the reason rather than waiting on the queue
        out.put(f"error: {type(exc).__name__}: {exc}")
    finally:
        ledger.dispose()


def _naive_worker(url: str, barrier, out) -> None:
    """Negative control: read, check, then write in separate transactions, without the lock."""
    import time
    import uuid

    from sqlalchemy import create_engine

    engine = create_engine(url, connect_args={"timeout": 120} if url.startswith("sqlite") else {})
    barrier.wait()
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT noise_multiplier, sample_rate, steps_planned FROM charges")).all()
    except Exception as exc:  # say why (e.g. the server's connections exhausted) instead of timing out the queue
        out.put(f"error: {type(exc).__name__}: {str(exc)[:200]}")
        return
    spent = [SubsampledGaussian(*r) for r in rows]
    if filters.filter_epsilon(spent + [RUN], delta=DELTA) > _cap_for(K):
        out.put("refused")
        return
    time.sleep(0.5)  # the window in which another client reads the same state
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO charges (id, dataset_id, kind, sampler, noise_multiplier, sample_rate, steps_planned, "
                "max_grad_norm, unit, neighbouring, n_records, job, data_version, created_at, lease_expires_at) "
                "VALUES (:id, 1, 'subsampled_gaussian', 'poisson', :s, :q, :t, 1.0, 'record', 'add_remove', 10000, "
                "'naive', 'v', '2026', '2099')"
            ),
            {"id": str(uuid.uuid4()), "s": RUN.noise_multiplier, "q": RUN.sample_rate, "t": RUN.steps},
        )
    engine.dispose()
    out.put("granted")


K, CLIENTS = 3, 40


def _race(url: str, target) -> list[str]:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(CLIENTS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(url, barrier, out)) for _ in range(CLIENTS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    return results


@pytest.mark.slow
def test_40_concurrent_processes_grant_exactly_what_the_budget_allows(ledger_url):
    _ledger(ledger_url, k=K).dispose()
    results = _race(ledger_url, _safe_worker)
    assert results.count("granted") == K, results
    ledger = Ledger(ledger_url, create=False)
    assert ledger.budget("notes").charges == {"reserved": K}
    assert ledger.verify() == []


@pytest.mark.slow
def test_negative_control_naive_read_check_write_overspends(ledger_url):
    """Shows the race above is real: without the lock, the same test sees overspending."""
    _ledger(ledger_url, k=K).dispose()
    results = _race(ledger_url, _naive_worker)
    assert results.count("granted") > K, results


def test_blocks_compose_in_parallel_and_recurring_runs_move_to_fresh_blocks(make_ledger, ledger_url):
    """Sage-style blocks: each block has its own filter; a run is charged to the blocks it reads."""
    cap = _cap_for(2)
    ledger = make_ledger(ledger_url, dataset="tickets", unit="record", delta=DELTA, epsilon_cap=cap)
    for month in ("2026-09", "2026-10"):
        ledger.add_block("tickets", name=month, n_records=10_000)

    def run(blocks):
        return ledger.reserve(dataset="tickets", mechanism=RUN, max_grad_norm=1.0, n_records=10_000 * len(blocks),
                              job="monthly", data_version="v", blocks=blocks)

    run(["2026-09"])
    run(["2026-09", "2026-10"])
    assert ledger.fresh_blocks("tickets", RUN) == ["2026-10"]  # September is exhausted
    with pytest.raises(BudgetExceededError, match="block '2026-09'"):
        run(["2026-09", "2026-10"])
    run(["2026-10"])
    assert ledger.fresh_blocks("tickets", RUN) == []
    ledger.add_block("tickets", name="2026-11", n_records=10_000)  # new people bring new budget
    assert ledger.fresh_blocks("tickets", RUN) == ["2026-11"]
    run(ledger.fresh_blocks("tickets", RUN))

    b = ledger.budget("tickets")
    spent = {x.name: x.spent for x in b.blocks}
    two = filters.filter_epsilon([RUN, RUN], delta=DELTA)
    assert spent == pytest.approx({"2026-09": two, "2026-10": two, "2026-11": filters.filter_epsilon([RUN], delta=DELTA)})
    assert b.spent == pytest.approx(two)
    assert ledger.charges("tickets")[1].blocks == ("2026-09", "2026-10")
    assert ledger.verify() == []

    # moving a charge to another block is detected
    tamper(ledger, "DELETE FROM charge_blocks WHERE block_id = (SELECT id FROM blocks WHERE name = '2026-11')")
    assert any("edited" in p for p in ledger.verify())


def test_partitioned_dataset_needs_named_blocks(ledger_url):
    ledger = _ledger(ledger_url)
    with pytest.raises(ConfigError, match="no blocks"):
        ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v", blocks=["x"])
    ledger.add_block("notes", name="2026-11", n_records=10_000)
    with pytest.raises(ConfigError, match="name the blocks"):
        _reserve(ledger)
    with pytest.raises(LedgerError, match="no block"):
        ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v", blocks=["1999-01"])
    with pytest.raises(LedgerError, match="append-only"):
        ledger.add_block("notes", name="2026-11", n_records=5)


def _exercise(ledger: Ledger, privacy_filter=filters.GRID_FILTER) -> None:
    """Charges in every state, on a plain and on a partitioned dataset."""
    done = _reserve(ledger)
    ledger.start(done.id)
    ledger.record_finished(done.id, steps_run=123)
    ledger.commit(done.id, steps_run=123)  # early stop: counts 123 of 500 steps
    died = _reserve(ledger, SubsampledGaussian(2.0, 0.01, 300))
    ledger.start(died.id)
    ledger.fail(died.id, reason="worker lost")
    ledger.release(_reserve(ledger).id, reason="cancelled")
    _reserve(ledger, SubsampledGaussian(2.0, 0.01, 300))
    ledger.register_dataset(name="tickets", unit="record", delta=DELTA, epsilon_cap=_cap_for(3), privacy_filter=privacy_filter)
    for month in ("2026-09", "2026-10"):
        ledger.add_block("tickets", name=month, n_records=10_000)
    for blocks in (["2026-09"], ["2026-09", "2026-10"]):
        c = ledger.reserve(dataset="tickets", mechanism=RUN, max_grad_norm=1.0, n_records=20_000, job="m",
                           data_version="v", blocks=blocks)
        ledger.start(c.id)
        ledger.record_finished(c.id, steps_run=400)
        ledger.commit(c.id, steps_run=400)


def test_spend_index_matches_the_charges_in_every_state(ledger_url):
    """Admission reads the derived spend index; it must equal what the charges and events give."""
    ledger = _ledger(ledger_url, k=6)
    _exercise(ledger)
    assert ledger.verify() == []
    expected = filters.filter_epsilon(
        [SubsampledGaussian(1.0, 0.01, 123), SubsampledGaussian(2.0, 0.01, 300), SubsampledGaussian(2.0, 0.01, 300)],
        delta=DELTA,
    )
    assert ledger.budget("notes").spent == pytest.approx(expected, rel=1e-12)
    # Per block: what the charges that read each block give (the record, replayed from events).
    charges = ledger.charges("tickets")
    for block in ledger.budget("tickets").blocks:
        read = [c.charged for c in charges if c.charged is not None and block.name in c.blocks]
        assert len(read) == {"2026-09": 2, "2026-10": 1}[block.name]
        assert block.spent == pytest.approx(filters.filter_epsilon(read, delta=DELTA), rel=1e-12)
    with ledger.engine.connect() as conn:
        totals = dict(conn.execute(text(
            "SELECT t.scope || ':' || CAST(t.noise_multiplier AS TEXT), t.steps FROM spend_totals t "
            "JOIN datasets d ON d.id = t.dataset_id WHERE d.name = 'notes'"
        )).all())
    assert {k.split(":")[0] + ":" + str(float(k.split(":")[1])): v for k, v in totals.items()} == {":1.0": 123, ":2.0": 600}


def test_verify_detects_a_tampered_spend_index(ledger_url):
    ledger = _ledger(ledger_url, k=6)
    _exercise(ledger)
    tamper(ledger, "UPDATE spend_totals SET steps = steps - 100 WHERE scope = '2026-09'")  # lowered to make room
    assert any("spend total for scope '2026-09'" in p for p in ledger.verify())
    tamper(ledger, "UPDATE spend_totals SET steps = steps + 100 WHERE scope = '2026-09'")
    tamper(ledger, "UPDATE charge_states SET state = 'released', steps_counted = 0 WHERE state = 'failed_charged'")
    assert any("state index" in p for p in ledger.verify())
    before = {b.name: b.spent for b in ledger.budget("tickets").blocks}
    # lowering a stored one-step RDP curve would make room just as well
    tamper(ledger, "UPDATE spend_totals SET rdp_per_step = :c WHERE scope = '2026-10'",
           {"c": "[" + ", ".join(["0.0"] * len(filters.FILTER_ORDERS)) + "]"})
    assert {b.name: b.spent for b in ledger.budget("tickets").blocks}["2026-10"] < before["2026-10"]  # admission sees it
    assert any("stored RDP curve for scope '2026-10'" in p for p in ledger.verify())  # and verify catches it


def test_a_fresh_process_reads_the_stored_curves_not_a_cache(ledger_url):
    """Budgets come from the RDP curves stored with the totals: equal to recomputing them."""
    ledger = _ledger(ledger_url, k=6)
    _exercise(ledger)
    warm = ledger.budget("notes").spent, [b.spent for b in ledger.budget("tickets").blocks]
    accounting._rdp_one_step.cache_clear()
    assert (ledger.budget("notes").spent, [b.spent for b in ledger.budget("tickets").blocks]) == warm
    assert accounting._rdp_one_step.cache_info().currsize == 0  # nothing was recomputed


def test_upgrading_an_old_ledger_backfills_the_spend_index(ledger_url):
    """A ledger written before migration 0003 gets its index rebuilt from its events."""
    from alembic import command
    from alembic.config import Config

    from dpops.ledger.schema import MIGRATIONS

    ledger = _ledger(ledger_url, k=2, privacy_filter=filters.V1_FILTER)  # as the old code registered them
    _exercise(ledger, privacy_filter=filters.V1_FILTER)
    before = {name: ledger.budget(name).spent for name in ("notes", "tickets")}
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with ledger.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0002")  # drops the index tables, as if written by the old code
        assert "spend_totals" not in conn.dialect.get_table_names(conn)
    ledger.dispose()
    with pytest.raises(LedgerSchemaError, match="dpops ledger upgrade"):  # opening never migrates
        Ledger(ledger_url)
    ledger_schema.upgrade(Ledger(ledger_url, create=False).engine)  # `dpops ledger upgrade`: 0003's backfill included
    upgraded = Ledger(ledger_url)
    assert upgraded.verify() == []
    assert {name: upgraded.budget(name).spent for name in ("notes", "tickets")} == before
    # Admission sees the old spend: it grants exactly what the cap leaves beside it.
    old = [c.charged for c in upgraded.charges("notes") if c.charged is not None]
    room = next(k for k in range(10) if filters.filter_epsilon(old + [RUN] * (k + 1), delta=DELTA) > _cap_for(2))
    for _ in range(room):
        _reserve(upgraded)
    with pytest.raises(BudgetExceededError):
        _reserve(upgraded)


def test_plan_fitted_to_the_remaining_budget_leaves_room_for_the_planned_runs(ledger_url):
    """`dp.fit_to_budget`: the noise is raised so that the planned runs all pass the filter."""
    from dpops.config.schema import DatasetConfig, DPSettings
    from dpops.pipeline import planning as privacy

    ledger = _ledger(ledger_url, k=2)
    _reserve(ledger)  # an earlier run took part of the budget
    ds = DatasetConfig.model_validate({
        "name": "notes", "files": {"train": "a", "holdout": "b", "eval": "c"}, "text_column": "t", "label_column": "l",
        "labels": ["0", "1"], "privacy": {"epsilon_cap": _cap_for(2), "delta": DELTA},
    })
    dp = DPSettings(target_epsilon=50.0, expected_batch_size=100, steps=500, fit_to_budget={"planned_runs": 3})
    p = privacy.plan(dataset=ds, dp=dp, n_records=10_000, ledger=ledger)
    assert p.fitted_runs == 3 and p.noise_multiplier > RUN.noise_multiplier
    for _ in range(3):
        privacy.reserve(ledger, p, job="j", data_version="v")
    with pytest.raises(BudgetExceededError):  # the fit was tight: a fourth one does not pass
        privacy.reserve(ledger, p, job="j", data_version="v")
    with pytest.raises(BudgetExceededError, match="max_noise_multiplier"):  # nothing useful is left to fit into
        privacy.plan(dataset=ds, dp=dp, n_records=10_000, ledger=ledger)
