"""Shared fixtures. Every output path goes to tmp_path; services are real and local."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from dpops.config.workspace import apply_quiet_env

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get("DPOPS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

apply_quiet_env()

pytest_plugins = ["tests.fixtures.ledgers", "tests.fixtures.configs"]


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def smoke_job(configs_dir) -> Path:
    """A copy of configs/ in a temporary directory; its sst2 smoke job (seconds-long), to edit freely."""
    return configs_dir / "jobs" / "sst2_smoke.yaml"


@pytest.fixture(autouse=True)
def _workspace_in_tmp(tmp_path, monkeypatch):
    """Every test's DPOPS_HOME is under tmp_path (the data fingerprint key file and steward-only
    output are written there on first use, never into the project); workspace_env uses the same."""
    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "dpops-home"))
    monkeypatch.delenv("DPOPS_FINGERPRINT_KEY", raising=False)
    monkeypatch.delenv("DPOPS_ANCHOR_KEY", raising=False)
    monkeypatch.delenv("DPOPS_ANCHOR_LOG", raising=False)


@pytest.fixture(autouse=True)
def _dispose_ledgers(monkeypatch):
    """Dispose every Ledger a test opened, at its end. A ledger left to the garbage collector keeps
    its pool's PostgreSQL connections open; hundreds of tests' worth would exhaust the server's
    100 connections before the 40-process race tests (tests/test_ledger.py) get theirs."""
    from dpops.ledger import store as ledger_store

    opened: list = []
    init = ledger_store.Ledger.__init__

    def tracked(self, *args, **kwargs):
        opened.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ledger_store.Ledger, "__init__", tracked)
    yield
    for ledger in opened:
        engine = getattr(ledger, "engine", None)
        if engine is not None:
            engine.dispose()


@pytest.fixture
def workspace_env(tmp_path, monkeypatch):
    """A fresh dpops workspace (ledger, MLflow store, runs) under tmp_path."""
    home = tmp_path / "dpops-home"
    monkeypatch.setenv("DPOPS_HOME", str(home))
    monkeypatch.delenv("DPOPS_LEDGER_URL", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def _pg_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", connect_timeout=3):
            return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_database():
    """A throwaway PostgreSQL database on the local server, dropped afterwards.

    Outside CI, the PostgreSQL tests skip when no server answers; in CI (CI=true) they fail.
    """
    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (CI must start it)")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    import psycopg

    name = f"dpops_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    """The same ledger contract runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    base = request.getfixturevalue("pg_database")
    # one schema-less database per session: give each test clean tables
    from sqlalchemy import create_engine

    from dpops.ledger.schema import Base

    engine = create_engine(base)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()
    return base


@pytest.fixture
def forbid_reading(monkeypatch):
    """Call it once the charge is reserved: from then on, reading any training record fails the test."""
    from dpops.data import source as datamod
    from dpops.pipeline import stages

    def read(*args, **kwargs):
        raise AssertionError("records were read")

    def forbid() -> None:
        monkeypatch.setattr(stages, "training_records", read)
        monkeypatch.setattr(datamod, "load_split", read)
    return forbid
