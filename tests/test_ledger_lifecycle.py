"""The ledger's lifecycle, the MLflow way: opening checks the schema, only `dpops ledger upgrade`
migrates it; and the ledger's refusals are specific LedgerError subclasses, on SQLite and PostgreSQL."""

import sqlite3

import pytest
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.config.schema import DatasetConfig
from dpops.errors import (
    EXIT_REFUSED,
    BlockExistsError,
    ChargeNotFoundError,
    DatasetNotRegisteredError,
    IllegalTransitionError,
    LeaseExpiredError,
    LedgerError,
    LedgerSchemaError,
    exit_code,
)
from dpops.ledger import schema as ledger_schema
from dpops.ledger.store import Ledger
from dpops.pipeline import planning as privacy
from dpops.pipeline import publish
from dpops.privacy.accounting import SubsampledGaussian
from tests.helpers import tamper

RUN = SubsampledGaussian(1.0, 0.01, 100)
OLD = "0006"


def _at_revision(url: str, revision: str) -> None:
    """A ledger as an older dpops left it: its schema built by Alembic up to ``revision`` only."""
    from alembic import command
    from alembic.config import Config

    engine = Ledger(url, create=False).engine
    cfg = Config()
    cfg.set_main_option("script_location", str(ledger_schema.MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _revision(url: str) -> str:
    engine = Ledger(url, create=False).engine
    try:
        return ledger_schema.schema_revision(engine)
    finally:
        engine.dispose()


def _register(ledger: Ledger, name: str = "notes") -> None:
    ledger.register_dataset(name=name, unit="record", delta=1e-5, epsilon_cap=50.0)


def _reserve(ledger: Ledger, name: str = "notes", blocks=None):
    return ledger.reserve(dataset=name, mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v",
                          blocks=blocks)


# ----------------------------------------------------------------- opening checks, never migrates


def test_opening_a_ledger_behind_head_refuses_and_leaves_its_schema_as_it_is(ledger_url):
    """Fails on the old code: opening migrated the schema to head (as the owner), so no error was
    raised and the revision moved."""
    assert ledger_schema.head_revision() != OLD
    _at_revision(ledger_url, OLD)
    with pytest.raises(LedgerSchemaError, match="dpops ledger upgrade") as refused:
        Ledger(ledger_url)
    message = str(refused.value)
    assert f"revision {OLD}" in message and f"needs {ledger_schema.head_revision()}" in message
    assert ("DPOPS_LEDGER_ADMIN_URL" in message) == ledger_url.startswith("postgresql")
    assert isinstance(refused.value, LedgerError) and exit_code(refused.value) == EXIT_REFUSED
    assert _revision(ledger_url) == OLD  # unchanged: no DDL ran


def test_dpops_ledger_upgrade_brings_it_to_head_then_it_opens(make_ledger, ledger_url, workspace_env, monkeypatch):
    """Fails on the old code (no `dpops ledger upgrade` command)."""
    _at_revision(ledger_url, OLD)
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    monkeypatch.delenv("DPOPS_LEDGER_ADMIN_URL", raising=False)
    runner = CliRunner()
    budget = runner.invoke(app, ["budget"])  # any command on the old ledger: refused, exit 3, naming the fix
    assert budget.exit_code == EXIT_REFUSED and "dpops ledger upgrade" in budget.output, budget.output
    assert _revision(ledger_url) == OLD
    first = runner.invoke(app, ["ledger", "upgrade"])
    assert first.exit_code == 0, first.output
    assert f"from revision {OLD} to {ledger_schema.head_revision()}" in first.output
    assert _revision(ledger_url) == ledger_schema.head_revision()
    ledger = make_ledger(ledger_url, dataset="notes")
    _reserve(ledger)
    assert ledger.verify() == []
    ledger.dispose()
    again = runner.invoke(app, ["ledger", "upgrade"])  # idempotent
    assert again.exit_code == 0 and f"already at revision {ledger_schema.head_revision()}" in again.output, again.output


def test_migrate_is_a_hidden_alias_of_upgrade(tmp_path, workspace_env, monkeypatch):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    _at_revision(url, OLD)
    monkeypatch.setenv("DPOPS_LEDGER_URL", url)
    runner = CliRunner()
    result = runner.invoke(app, ["ledger", "migrate"])
    assert result.exit_code == 0 and f"from revision {OLD} to" in result.output, result.output
    assert _revision(url) == ledger_schema.head_revision()
    listed = runner.invoke(app, ["ledger", "--help"]).output
    assert "upgrade" in listed and "migrate" not in listed


def test_a_fresh_empty_database_is_created_at_head_on_first_open(ledger_url):
    ledger = Ledger(ledger_url)
    assert ledger_schema.schema_revision(ledger.engine) == ledger_schema.head_revision()
    _register(ledger)
    assert ledger.datasets() == ["notes"]
    ledger.dispose()
    assert Ledger(ledger_url).datasets() == ["notes"]  # and reopens, at head


def test_a_schema_ahead_of_this_code_is_refused_on_open_and_by_upgrade(ledger_url, workspace_env, monkeypatch):
    """Fails on the old code (it ran Alembic's upgrade on a revision it does not ship: an Alembic
    error, not a LedgerError)."""
    Ledger(ledger_url).dispose()
    tamper(Ledger(ledger_url, create=False), "UPDATE alembic_version SET version_num = '9999_newer'")
    with pytest.raises(LedgerSchemaError, match="'9999_newer', which this dpops does not know"):
        Ledger(ledger_url)
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    monkeypatch.delenv("DPOPS_LEDGER_ADMIN_URL", raising=False)
    result = CliRunner().invoke(app, ["ledger", "upgrade"])
    assert result.exit_code == EXIT_REFUSED and "does not know" in result.output, result.output
    assert _revision(ledger_url) == "9999_newer"


def test_opening_at_head_takes_no_database_wide_lock(tmp_path, make_ledger):
    """Fails on the old code: the schema check began SQLite's BEGIN IMMEDIATE, so an open waited for
    (and, past the lock timeout, failed on) any other process's write transaction."""
    url = make_ledger(tmp_path / "ledger.db", dataset="notes").url
    writer = sqlite3.connect(tmp_path / "ledger.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        ledger = Ledger(url, lock_timeout=0.2)
        assert ledger_schema.schema_revision(ledger.engine) == ledger_schema.head_revision()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert ledger.datasets() == ["notes"]


# ----------------------------------------------------------------- specific refusals


def test_each_refusal_is_its_own_ledger_error(make_ledger, ledger_url):
    """Fails on the old code (every refusal was a plain LedgerError)."""
    ledger = make_ledger(ledger_url)
    with pytest.raises(ChargeNotFoundError, match="charge 'nope' does not exist"):
        ledger.charge("nope")
    with pytest.raises(DatasetNotRegisteredError, match="dataset 'ghost' is not registered in the ledger"):
        ledger.budget("ghost")
    with pytest.raises(DatasetNotRegisteredError, match="not registered"):
        list(ledger.history("ghost"))
    with pytest.raises(DatasetNotRegisteredError, match="not registered"):
        _reserve(ledger, "ghost")
    with pytest.raises(DatasetNotRegisteredError, match="has field 'budget_of: ghost'"):
        ledger.register_dataset(name="ghost", unit="record", delta=1e-5, epsilon_cap=4.0, source="data/x.tsv",
                                linked_from="alias")
    _register(ledger)
    ledger.add_block("notes", name="jan", n_records=10_000)
    with pytest.raises(BlockExistsError, match="already has a block 'jan'; blocks are append-only"):
        ledger.add_block("notes", name="jan", n_records=10_000)
    c = _reserve(ledger, blocks=["jan"])
    ledger.start(c.id)
    with pytest.raises(IllegalTransitionError, match="cannot go from 'running' to 'released'"):
        ledger.release(c.id, reason="r")
    ledger.fail(c.id, reason="dead")
    with pytest.raises(IllegalTransitionError, match="cannot go from 'failed_charged' to 'running'"):
        ledger.start(c.id)
    ledger.lease_seconds = 0.0
    stale = _reserve(ledger, blocks=["jan"])
    with pytest.raises(LeaseExpiredError, match="the reservation expired at"):
        ledger.start(stale.id)
    assert ledger.charge(stale.id).state == "expired" and ledger.verify() == []
    for cls in (LedgerSchemaError, DatasetNotRegisteredError, ChargeNotFoundError, BlockExistsError,
                IllegalTransitionError, LeaseExpiredError):
        assert issubclass(cls, LedgerError) and exit_code(cls("x")) == EXIT_REFUSED


def _tickets() -> DatasetConfig:
    return DatasetConfig(name="notes", files={"train": "t", "holdout": "h", "eval": "e"}, text_column="text",
                         label_column="label", labels=["0", "1"], blocks={"column": "month"},
                         privacy={"epsilon_cap": 50.0, "delta": 1e-5})


def test_register_blocks_skips_only_a_block_added_in_between(make_ledger, ledger_url):
    """Fails on the old code: it swallowed every LedgerError of add_block, so the refusal to
    partition a dataset whole-dataset runs had read was silently dropped."""
    ledger = make_ledger(ledger_url, dataset="notes")
    ledger.add_block("notes", name="jan", n_records=100)  # another run added it in between
    new = [privacy.Block("jan", 100, 50.0, registered=False), privacy.Block("feb", 100, 50.0, registered=False)]
    assert privacy.register_blocks(ledger, _tickets(), new) == ["feb"]
    other = make_ledger(ledger_url, dataset="whole")
    _reserve(other, "whole")  # read the whole dataset: it may not be partitioned now
    cfg = _tickets().model_copy(update={"name": "whole"})
    with pytest.raises(LedgerError, match="already read the whole dataset"):
        privacy.register_blocks(other, cfg, [privacy.Block("mar", 100, 50.0, registered=False)])
    assert other.budget("whole").blocks == []


def test_counted_is_empty_only_for_an_unregistered_dataset(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url)
    assert ledger.counted("ghost") == []
    _register(ledger)
    _reserve(ledger)
    assert ledger.counted("notes") == [RUN]


def test_the_gate_names_a_missing_charge_and_propagates_any_other_ledger_fault(make_ledger, ledger_url, monkeypatch):
    """Fails on the old code: any LedgerError of ledger.charge, a broken record too, became the
    gate's 'no charge to check' reason."""
    ledger = make_ledger(ledger_url)
    dataset, why = publish._charge_dataset(ledger, "nope", "m/1")
    assert dataset is None and why == "model m/1: charge 'nope' does not exist"
    _register(ledger)
    c = _reserve(ledger)
    assert publish._charge_dataset(ledger, c.id, "m/1") == ("notes", None)

    def broken(charge_id):
        raise LedgerError(f"charge {charge_id}: a broken record")

    monkeypatch.setattr(ledger, "charge", broken)
    with pytest.raises(LedgerError, match="a broken record"):
        publish._charge_dataset(ledger, c.id, "m/1")
