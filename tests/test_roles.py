"""Two roles on PostgreSQL: the admin migrates, the pipeline role only reads and appends.

Each PostgreSQL test gets its own database and role, dropped afterwards (roles are server-wide).
"""

import uuid

import pytest
from sqlalchemy import create_engine, exc, text
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.errors import LedgerError, LedgerSchemaError
from dpops.ledger import roles as ledger_roles
from dpops.ledger import schema as ledger_schema
from dpops.ledger.store import Ledger
from dpops.privacy.accounting import SubsampledGaussian

RUN = SubsampledGaussian(1.0, 0.01, 100)
AUDIT = {"verdict": "PASS", "reasons": [], "claimed_epsilon": 1.0, "canary_epsilon_lower_bound": 0.1,
         "canary_ceiling": 3.0, "mia_epsilon_lower_bound": 0.0, "cross_check_ok": True}
SERVER = "postgresql+psycopg://{user}@127.0.0.1:5432/{db}"


@pytest.fixture
def pg(pg_database):
    """(admin URL, pipeline role name, pipeline URL) on a fresh database; database and role dropped after."""
    import psycopg

    db, role = f"dpops_roles_{uuid.uuid4().hex[:10]}", f"dpops_pipe_{uuid.uuid4().hex[:10]}"
    dsn = "host=127.0.0.1 port=5432 user=postgres dbname=test"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    yield SERVER.format(user="postgres", db=db), role, SERVER.format(user=role, db=db)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'DROP ROLE IF EXISTS "{role}"')


def _cycle(ledger: Ledger) -> str:
    ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=50.0)
    ledger.add_block("notes", name="jan", n_records=10_000)
    c = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                       blocks=["jan"])
    ledger.start(c.id)
    ledger.record_progress(c.id, steps_done=100)
    ledger.record_finished(c.id, steps_run=100)
    ledger.commit(c.id, steps_run=100)
    return c.id


def _migrate(admin_url: str, role: str) -> None:
    engine = create_engine(admin_url)
    ledger_schema.upgrade(engine)
    ledger_roles.grant_pipeline_role(engine, role)
    engine.dispose()


REFUSED = [
    "DELETE FROM events",
    "UPDATE charges SET noise_multiplier = 5.0",
    "UPDATE datasets SET epsilon_cap = 100.0",
    "DROP TABLE events",
    "TRUNCATE events CASCADE",
    "ALTER TABLE events DISABLE TRIGGER ALL",
    "DROP TRIGGER dpops_append_only_events ON events",
    "SET session_replication_role = replica",
    "CREATE TABLE events_copy (id integer)",
]


def test_the_pipeline_role_runs_the_ledger_and_cannot_rewrite_or_drop_it(pg):
    """Fails on the old code (no grant_pipeline_role; and without it the role can read nothing)."""
    admin_url, role, pipeline_url = pg
    _migrate(admin_url, role)
    ledger = Ledger(pipeline_url)
    charge = _cycle(ledger)
    assert ledger.charge(charge).state == "committed" and ledger.budget("notes").spent > 0
    # every other write the pipeline makes: notes, binding, evidence, decision, release, failure, expiry
    ledger.annotate(charge, note="weekly")
    ledger.bind_model(charge, model_name="m", model_version=1, mlflow_run_id="r", artifact_sha256="ab" * 32)
    ledger.record_evidence(charge, task="classification", figures={"accuracy": 0.9}, audit=AUDIT)
    ledger.record_decision("notes", decision={"charge_id": charge, "decision": "PROMOTE", "reasons": []})
    ledger.lease_seconds = 0.0
    stale = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                           blocks=["jan"])
    with pytest.raises(LedgerError):
        ledger.start(stale.id)  # lease 0: expired when it tries to start
    ledger.lease_seconds = 3600.0
    ledger.release(ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j",
                                  data_version="v", blocks=["jan"]).id, reason="cancelled")
    dead = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                           blocks=["jan"])
    ledger.start(dead.id)
    ledger.fail(dead.id, reason="worker lost")
    assert [c.state for c in ledger.charges("notes")].count("expired") == 1
    assert ledger.verify() == []
    for statement in REFUSED:
        with pytest.raises(exc.DBAPIError) as refused:
            with ledger.engine.begin() as conn:
                conn.exec_driver_sql(statement)
        assert refused.value.orig.sqlstate == "42501", statement  # insufficient_privilege, not a trigger's refusal
    assert ledger.verify() == [] and ledger.charge(charge).state == "committed"
    ledger.dispose()


def test_a_pipeline_open_behind_head_refuses_and_names_upgrade(pg):
    """Fails on the old code (every open ran the upgrade: a permission error from the DDL, no LedgerError)."""
    from alembic import command
    from alembic.config import Config

    admin_url, role, pipeline_url = pg
    engine = create_engine(admin_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(ledger_schema.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0004")
    ledger_roles.grant_pipeline_role(engine, role)
    with pytest.raises(LedgerSchemaError, match=r"dpops ledger upgrade` as the admin role \(DPOPS_LEDGER_ADMIN_URL\)"):
        Ledger(pipeline_url)
    assert ledger_schema.schema_revision(engine) == "0004"
    engine.dispose()


@pytest.mark.parametrize("command", ["upgrade", "migrate"])  # migrate: the old name, a hidden alias
def test_upgrade_is_idempotent_and_grants_the_role(pg, monkeypatch, command):
    """Fails on the old code (no `dpops ledger upgrade`)."""
    admin_url, role, pipeline_url = pg
    monkeypatch.setenv("DPOPS_LEDGER_URL", pipeline_url)  # the pipeline's URL; the admin's wins for migrate
    monkeypatch.setenv("DPOPS_LEDGER_ADMIN_URL", admin_url)
    runner = CliRunner()
    first = runner.invoke(app, ["ledger", command, "--grant", role])
    assert first.exit_code == 0, first.output
    assert f"to {ledger_schema.head_revision()}" in first.output
    _cycle(Ledger(pipeline_url))
    second = runner.invoke(app, ["ledger", command, "--grant", role])
    assert second.exit_code == 0 and "already at revision" in second.output, second.output
    ledger = Ledger(pipeline_url)
    assert ledger.verify() == [] and ledger.budget("notes").spent > 0
    ledger.dispose()
    monkeypatch.delenv("DPOPS_LEDGER_ADMIN_URL")  # the pipeline role itself may not grant
    refused = runner.invoke(app, ["ledger", command, "--grant", role])
    assert refused.exit_code == 3 and "DPOPS_LEDGER_ADMIN_URL" in refused.output, refused.output
    monkeypatch.setenv("DPOPS_LEDGER_ADMIN_URL", admin_url)
    sql = runner.invoke(app, ["ledger", command, "--grant", role, "--print-sql"])
    assert sql.exit_code == 0 and f'GRANT UPDATE (head_seq, head_hash) ON TABLE datasets TO "{role}";' in sql.output


def test_a_role_that_could_take_the_owners_rights_is_refused(pg):
    """Fails on the old code (no grant_pipeline_role). The superuser owns everything already."""
    admin_url, role, _ = pg
    engine = create_engine(admin_url)
    ledger_schema.upgrade(engine)
    with pytest.raises(LedgerError, match="superuser"):
        ledger_roles.grant_pipeline_role(engine, "postgres")
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN CREATEROLE')
    with pytest.raises(LedgerError, match="create roles"):
        ledger_roles.grant_pipeline_role(engine, role)
    with engine.connect() as conn:  # refused whole: no grant was kept
        assert not conn.scalar(text("SELECT has_table_privilege(:r, 'events', 'INSERT')"), {"r": role})
    engine.dispose()


def test_sqlite_upgrade_then_opens_at_head_run_no_upgrade(workspace_env, monkeypatch):
    """Fails on the old code (no `dpops ledger upgrade`; and every open ran the upgrade)."""
    result = CliRunner().invoke(app, ["ledger", "upgrade"])
    assert result.exit_code == 0 and "from revision none" in result.output, result.output
    url = f"sqlite:///{workspace_env / 'ledger.db'}"
    calls = []
    real = ledger_schema.upgrade
    monkeypatch.setattr(ledger_schema, "upgrade", lambda engine, **kw: (calls.append(1), real(engine, **kw))[1])
    ledger = Ledger(url)
    _cycle(ledger)
    assert calls == [] and ledger.verify() == []
    assert CliRunner().invoke(app, ["ledger", "upgrade", "--grant", "pipe"]).exit_code == 2  # no roles on SQLite


def test_a_fresh_sqlite_ledger_is_still_created_on_first_open(tmp_path, monkeypatch):
    """The demo's path: no upgrade step, the first open creates the schema (and only that one upgrades)."""
    calls = []
    real = ledger_schema.upgrade
    monkeypatch.setattr(ledger_schema, "upgrade", lambda engine, **kw: (calls.append(1), real(engine, **kw))[1])
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _cycle(Ledger(url))
    assert len(calls) == 1 and ledger_schema.schema_revision(Ledger(url, create=False).engine) == ledger_schema.head_revision()
    Ledger(url)
    assert len(calls) == 1
