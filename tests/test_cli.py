"""The CLI over a real ledger in a temporary workspace."""

import json

from typer.testing import CliRunner

from dpops.accounting import SubsampledGaussian
from dpops.cli import app
from dpops.ledger import Ledger

runner = CliRunner()


def test_budget_without_a_ledger(workspace_env):
    result = runner.invoke(app, ["budget"])
    assert result.exit_code == 0 and "no ledger yet" in result.output


def test_budget_prints_cap_spent_remaining_and_charges(workspace_env):
    workspace_env.mkdir(parents=True)
    ledger = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    ledger.register_dataset(name="notes", unit="record", delta=1e-6, epsilon_cap=8.0)
    c = ledger.reserve(dataset="notes", mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                       n_records=50_000, job="j", data_version="sha256:x")
    ledger.start(c.id)
    ledger.commit(c.id, steps_run=100)
    spent = ledger.budget("notes").spent

    table = runner.invoke(app, ["budget"])
    assert table.exit_code == 0, table.output
    assert "notes" in table.output and f"{spent:.3f}" in table.output and f"{8 - spent:.3f}" in table.output
    assert "committed 1" in table.output

    as_json = runner.invoke(app, ["budget", "notes", "--json"])
    [row] = json.loads(as_json.output)
    assert row["epsilon_cap"] == 8.0 and row["spent"] == spent and row["charges"] == {"committed": 1}

    unknown = runner.invoke(app, ["budget", "nope"])
    assert unknown.exit_code == 2 and "'nope' is not registered" in unknown.output
