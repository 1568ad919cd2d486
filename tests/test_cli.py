"""The CLI over a real ledger in a temporary workspace."""

import json

from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.privacy.accounting import SubsampledGaussian
from tests.helpers import tamper

runner = CliRunner()


def test_budget_without_a_ledger(workspace_env):
    result = runner.invoke(app, ["budget"])
    assert result.exit_code == 0 and "no ledger yet" in result.output


def test_budget_prints_cap_spent_remaining_and_charges(workspace_env, workspace_ledger):
    workspace_env.mkdir(parents=True)
    ledger = workspace_ledger(dataset="notes", unit="record", delta=1e-6, epsilon_cap=8.0)
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
    assert unknown.exit_code == 3 and "'nope' is not registered" in unknown.output


def test_register_history_verify_release(workspace_env, workspace_ledger, project_root):
    reg = runner.invoke(app, ["dataset", "register", str(project_root / "configs/datasets/sst2.yaml")])
    assert reg.exit_code == 0, reg.output
    ledger = workspace_ledger()
    mech = SubsampledGaussian(1.0, 0.001, 100)
    unused = ledger.reserve(dataset="sst2", mechanism=mech, max_grad_norm=1.0, n_records=60_000, job="j", data_version="v")
    read = ledger.reserve(dataset="sst2", mechanism=mech, max_grad_norm=1.0, n_records=60_000, job="j", data_version="v")
    ledger.start(read.id)

    released = runner.invoke(app, ["ledger", "release", unused.id, "--reason", "cancelled"])
    assert released.exit_code == 0 and "released" in released.output
    refused = runner.invoke(app, ["ledger", "release", read.id, "--reason", "please"])
    assert refused.exit_code == 3 and "never released" in refused.output

    history = runner.invoke(app, ["ledger", "history", "sst2"])
    events = [line.split()[2] for line in history.output.strip().splitlines()]
    assert events == ["registered", "reserved", "reserved", "running", "released"]

    ok = runner.invoke(app, ["ledger", "verify"])
    assert ok.exit_code == 0 and "verifies" in ok.output
    tamper(ledger, "UPDATE charges SET steps_planned = 1")
    bad = runner.invoke(app, ["ledger", "verify"])
    assert bad.exit_code == 1 and "edited" in bad.output

    budget = runner.invoke(app, ["budget", "sst2"])
    assert "pld estimate" in budget.output and "guaranteed" in budget.output


def test_ledger_fail_closes_a_dead_running_charge_charged_in_full(workspace_env, workspace_ledger):
    """Issue 16: a charge whose process died stayed `running` for ever, with no command to close it."""
    workspace_env.mkdir(parents=True)
    ledger = workspace_ledger(dataset="notes", unit="record", delta=1e-5, epsilon_cap=8.0)
    mech = SubsampledGaussian(1.0, 0.01, 100)
    c = ledger.reserve(dataset="notes", mechanism=mech, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v")
    reserved = runner.invoke(app, ["ledger", "fail", c.id, "--reason", "worker lost"])
    assert reserved.exit_code == 3 and "'reserved'" in reserved.output  # never started: release it instead
    ledger.start(c.id)
    spent = ledger.budget("notes").spent
    out = runner.invoke(app, ["ledger", "fail", c.id, "--reason", "worker lost"])
    assert out.exit_code == 0, out.output
    assert "failed_charged" in out.output and "charged in full (100 steps)" in out.output
    assert ledger.charge(c.id).state == "failed_charged" and ledger.budget("notes").spent == spent
    assert runner.invoke(app, ["ledger", "fail", c.id, "--reason", "again"]).exit_code == 3
    assert ledger.verify() == []


def test_the_readme_exit_code_table_is_the_one_the_commands_use(project_root):
    """One table of exit codes: the README's rows are exactly the codes dpops.errors defines."""
    import re

    from dpops import errors

    text = (project_root / "README.md").read_text()
    section = text[text.index("### Exit codes"):]
    section = section[: section.index("\n\n**")]
    documented = [int(m) for m in re.findall(r"^\| (\d) \|", section, re.M)]
    defined = sorted(v for k, v in vars(errors).items() if k.startswith("EXIT_"))
    assert documented == defined == [0, 1, 2, 3, 4, 5]
    for cls, code in ((errors.ConfigError, 2), (errors.LedgerSchemaError, 3), (errors.DatasetNotRegisteredError, 3),
                      (errors.LedgerUnavailableError, 4), (errors.TrainingError, 5)):
        assert errors.exit_code(cls("x")) == code
        row = re.search(rf"^\| {code} \| ([^|]+)\|", section, re.M).group(1)
        assert row.strip(), f"exit code {code} has no meaning in the README"
