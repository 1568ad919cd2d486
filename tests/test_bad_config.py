"""Bad config files and absurd numbers (issue 16, item 8): each is refused with one line naming the
file and the field, exit code 2 through the CLI, no traceback, and nothing registered or charged.

Also the ledger's own bounds (names and counts its columns cannot hold, on SQLite and PostgreSQL)
and its lock timeout (``DPOPS_LEDGER_LOCK_TIMEOUT``): a frozen lock holder costs exit code 4 after
the timeout, not a two-minute wait and a driver traceback.
"""

import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.config import loading
from dpops.config import schema as config
from dpops.errors import ConfigError, LedgerUnavailableError
from dpops.ledger import states as ledger_states
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from dpops.privacy.accounting import SubsampledGaussian
from tests.conftest import ROOT

runner = CliRunner()

BAD_BYTE = b"# caf\xe9\n"  # Latin-1, not UTF-8: byte 5 of line 1


def _dup_top(text: str) -> tuple[str, str]:
    """A second top-level `name:` at the end: PyYAML would keep it and register another dataset."""
    return text + "name: sst2-other\n", rf"key 'name' appears twice in one mapping \(lines 2 and {text.count(chr(10)) + 1}\)"


#: case -> (which file, edit of its text -> (new content, what the message says after the file name)).
#: The job cases run the first stage (resolve), which loads the job and its dataset before any data.
CASES = {
    "epsilon_cap .inf": ("dataset", lambda t: (t.replace("epsilon_cap: 4.0", "epsilon_cap: .inf"),
                                               r"field 'privacy\.epsilon_cap': Input should be a finite number")),
    "epsilon_cap 1e308": ("dataset", lambda t: (t.replace("epsilon_cap: 4.0", "epsilon_cap: 1e308"),
                                                r"field 'privacy\.epsilon_cap': Input should be less than or equal to 1000")),
    "delta .nan": ("dataset", lambda t: (t.replace("delta: 1.0e-6", "delta: .nan"),
                                         r"field 'privacy\.delta': Input should be a finite number")),
    "dataset name of 201 characters": ("dataset", lambda t: (t.replace("name: sst2", "name: " + "s" * 201),
                                                             r"field 'name': String should have at most 200 characters")),
    "non-UTF-8 bytes": ("dataset", lambda t: (BAD_BYTE + t.encode(), r"byte 5 \(line 1\) is not valid UTF-8")),
    "duplicate key (top level)": ("dataset", _dup_top),
    "duplicate key (nested)": ("dataset", lambda t: (t.replace("  delta: 1.0e-6", "  delta: 1.0e-6\n  epsilon_cap: 400"),
                                                     r"key 'epsilon_cap' appears twice in one mapping \(lines 16 and 18\)")),
    "dataset path is a directory": ("dataset", None),
    "a YAML list, not a mapping": ("dataset", lambda t: ("- name: sst2\n- unit: record\n",
                                                         r"expected a mapping at the top level, found list")),
    "target_epsilon .inf": ("job", lambda t: (t.replace("target_epsilon: 1.0", "target_epsilon: .inf"),
                                              r"field 'dp\.target_epsilon': Input should be a finite number")),
    "10^12 steps": ("job", lambda t: (t.replace("steps: 5", "steps: 1000000000000"),
                                      r"field 'dp\.steps': Input should be less than or equal to 10000000")),
    "negative batch size": ("job", lambda t: (t.replace("expected_batch_size: 32", "expected_batch_size: -32"),
                                              r"field 'dp\.expected_batch_size': Input should be greater than or equal to 1")),
    "learning rate .nan": ("job", lambda t: (t + "optim:\n  learning_rate: .nan\n",
                                             r"field 'optim\.learning_rate': Input should be a finite number")),
    "job name of 201 characters": ("job", lambda t: (t.replace("name: sst2-smoke", "name: " + "j" * 201),
                                                     r"field 'name': String should have at most 200 characters")),
    "duplicate key in the job (dp.steps)": ("job", lambda t: (t.replace("  steps: 5", "  steps: 5\n  steps: 50"),
                                                              r"key 'steps' appears twice in one mapping \(lines \d+ and \d+\)")),
    "job path is a directory": ("job", None),
}


def _no_ledger_entries(home: Path) -> None:
    if (home / "ledger.db").exists():
        assert Ledger(f"sqlite:///{home / 'ledger.db'}").datasets() == []


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_config_is_named_exit_2_and_nothing_registered(case, smoke_job, workspace_env):
    which, edit = CASES[case]
    path = smoke_job if which == "job" else smoke_job.parent.parent / "datasets" / "sst2.yaml"
    if edit is None:
        path, match = path.parent, r"is a directory(, not a YAML config file|; expected a job file)"
    else:
        content, match = edit(path.read_text())
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if which == "dataset":
        result = runner.invoke(app, ["dataset", "register", str(path)])
        assert result.exit_code == 2, result.output
        assert type(result.exception) is SystemExit and "Traceback" not in result.output
        [line] = result.output.strip().splitlines()  # one line
        message = line.removeprefix("dpops: ")
    else:
        with pytest.raises(ConfigError) as err:
            stages.resolve(str(path))
        message = str(err.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(match, message), message
    _no_ledger_entries(workspace_env)


def test_the_config_ceiling_is_the_ledgers():
    assert config.MAX_EPSILON == ledger_states.MAX_EPSILON_CAP


def test_a_yaml_merge_key_may_be_overridden(tmp_path):
    """Not a duplicate: `<<: *base` followed by one of its keys is how YAML overrides a default."""
    path = tmp_path / "p.yaml"
    path.write_text("base: &b {min_accuracy: 0.5}\ndatasets:\n  sst2:\n    <<: *b\n    min_accuracy: 0.7\n")
    assert loading._read_yaml(path)["datasets"]["sst2"] == {"min_accuracy": 0.7}


# --------------------------------------------------------------------------- the ledger's own bounds

MECH = SubsampledGaussian(1000.0, 0.001, 10)
RESERVE = dict(dataset="d", max_grad_norm=1.0, n_records=10_000, job="j", data_version="v")

LEDGER_CASES = {
    "steps 2^31": (dict(mechanism=SubsampledGaussian(1000.0, 0.001, 2**31)), r"field 'dp\.steps' must be an integer in \[1, 2147483647\]"),
    "n_records 2^31": (dict(n_records=2**31), r"field 'n_records' must be an integer in \[1, 2147483647\]"),
    "job name of 201 characters": (dict(job="j" * 201), r"field 'job' must be a non-empty name of at most 200 characters"),
    "data version of 201 characters": (dict(data_version="v" * 201), r"field 'data_version' must be .* at most 200 characters"),
    "flow run id of 101 characters": (dict(flow_run_id="f" * 101), r"field 'flow_run_id' must be .* at most 100 characters"),
    "max_grad_norm nan": (dict(max_grad_norm=float("nan")), r"field 'dp\.max_grad_norm' must be a positive finite number"),
}


@pytest.mark.parametrize("case", list(LEDGER_CASES))
def test_the_ledger_refuses_what_its_columns_cannot_hold(case, make_ledger, ledger_url):
    """Before any SQL, on both backends (PostgreSQL raised a raw psycopg error for steps 2^31; SQLite stored it)."""
    ledger = make_ledger(ledger_url, dataset="d", unit="record", delta=1e-6, epsilon_cap=4.0)
    change, match = LEDGER_CASES[case]
    with pytest.raises(ConfigError, match=match):
        ledger.reserve(**{"mechanism": MECH, **RESERVE, **change})
    assert ledger.charges("d") == [] and ledger.budget("d").charges == {}
    assert ledger.verify() == []
    ledger.reserve(mechanism=MECH, **RESERVE)  # the ledger still works


def test_the_ledger_refuses_a_dataset_name_longer_than_its_column(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url)
    with pytest.raises(ConfigError, match=r"field 'name' must be a non-empty name of at most 200 characters \(found 201\)"):
        ledger.register_dataset(name="d" * 201, unit="record", delta=1e-6, epsilon_cap=4.0)
    with pytest.raises(ConfigError, match=r"field 'block' must be .* at most 200"):
        ledger.register_dataset(name="d", unit="record", delta=1e-6, epsilon_cap=4.0)
        ledger.add_block("d", name="b" * 201, n_records=10)
    with pytest.raises(ConfigError, match=r"field 'n_records' must be an integer in \[1, 2147483647\]"):
        ledger.add_block("d", name="b", n_records=2**31)
    assert ledger.datasets() == ["d"] and ledger.budget("d").blocks == []


# --------------------------------------------------------------------------- the lock timeout


def _sqlite_ledger_with_a_frozen_holder(home: Path) -> sqlite3.Connection:
    """A registered ledger in ``home`` and another connection holding its write lock (BEGIN IMMEDIATE)."""
    home.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(f"sqlite:///{home / 'ledger.db'}")
    ledger.register_dataset(name="d", unit="record", delta=1e-6, epsilon_cap=4.0)
    ledger.dispose()
    holder = sqlite3.connect(home / "ledger.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _one_line_unavailable(output: str, url_part: str) -> None:
    assert "Traceback" not in output, output[-2000:]
    [line] = output.strip().splitlines()
    assert re.fullmatch(rf"dpops: ledger \S*{re.escape(url_part)}\S* is unavailable: it stayed locked by another process "
                        r"for 1 s \(DPOPS_LEDGER_LOCK_TIMEOUT\)\. Nothing changed; retry, or raise DPOPS_LEDGER_LOCK_TIMEOUT\.",
                        line), line


def test_a_frozen_sqlite_lock_holder_makes_dpops_budget_exit_4_within_the_timeout(workspace_env):
    """A real `dpops budget` process: one line on stderr and exit 4 after about a second, not a
    two-minute wait ending in a 234-line 'database is locked' traceback."""
    holder = _sqlite_ledger_with_a_frozen_holder(workspace_env)
    try:
        env = {**os.environ, "DPOPS_LEDGER_LOCK_TIMEOUT": "1", "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "dpops.cli", "budget"], env=env, capture_output=True, text=True,
                              timeout=30)
        took = time.monotonic() - start
    finally:
        holder.rollback()
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert took < 20 and proc.stdout == ""
    _one_line_unavailable(proc.stderr, "ledger.db")


@pytest.mark.parametrize("command", [["budget", "d"], ["ledger", "verify"], ["ledger", "history", "d"],
                                     ["dataset", "register", str(ROOT / "configs/datasets/sst2.yaml")]])
def test_every_ledger_command_exits_4_on_a_lock_timeout(command, workspace_env, monkeypatch):
    holder = _sqlite_ledger_with_a_frozen_holder(workspace_env)
    monkeypatch.setenv("DPOPS_LEDGER_LOCK_TIMEOUT", "1")
    try:
        result = runner.invoke(app, command)
    finally:
        holder.rollback()
    assert result.exit_code == 4 and type(result.exception) is SystemExit, result.output[-2000:]
    _one_line_unavailable(result.output, "ledger.db")
    assert Ledger(f"sqlite:///{workspace_env / 'ledger.db'}").datasets() == ["d"]  # nothing registered


def test_a_bad_lock_timeout_setting_is_named(workspace_env, monkeypatch):
    _sqlite_ledger_with_a_frozen_holder(workspace_env).rollback()
    monkeypatch.setenv("DPOPS_LEDGER_LOCK_TIMEOUT", "inf")
    result = runner.invoke(app, ["budget"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == "dpops: environment variable DPOPS_LEDGER_LOCK_TIMEOUT must be a number of seconds in (0, 86400]"


def test_a_postgresql_row_lock_held_past_the_timeout_refuses_the_reservation(make_ledger, pg_database, monkeypatch):
    """Another connection holds the dataset's row (SELECT ... FOR UPDATE); a reservation waits
    DPOPS_LEDGER_LOCK_TIMEOUT seconds, then raises LedgerUnavailableError and charges nothing. (The
    holder lets go after 15 s whatever happens, so code without a timeout fails instead of hanging.)"""
    import psycopg

    url = pg_database
    name = f"locked-{time.monotonic_ns()}"  # other tests of the session share this database
    make_ledger(url, dataset=name, unit="record", delta=1e-6, epsilon_cap=4.0).dispose()
    monkeypatch.setenv("DPOPS_LEDGER_LOCK_TIMEOUT", "1")
    ledger = make_ledger(url)
    holder = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
    holder.execute("SELECT id FROM datasets WHERE name = %s FOR UPDATE", (name,))
    release = threading.Timer(15, holder.rollback)
    release.start()
    try:
        start = time.monotonic()
        with pytest.raises(LedgerUnavailableError, match=r"ledger postgresql\+psycopg://postgres@127\.0\.0\.1:5432/\S+ is "
                           r"unavailable: it stayed locked by another process for 1 s \(DPOPS_LEDGER_LOCK_TIMEOUT\)"):
            ledger.reserve(mechanism=MECH, **{**RESERVE, "dataset": name})
        assert time.monotonic() - start < 10
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    assert ledger.charges(name) == [] and ledger.verify() == []
    ledger.reserve(mechanism=MECH, **{**RESERVE, "dataset": name})  # the lock is gone: admitted
    ledger.dispose()


def test_an_unreachable_postgresql_ledger_is_unavailable_and_its_password_not_shown():
    start = time.monotonic()
    with pytest.raises(LedgerUnavailableError) as err:
        Ledger("postgresql+psycopg://postgres:s3cret-pw@127.0.0.1:1/nowhere", lock_timeout=2)
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "s3cret-pw" not in message
    assert message.startswith("ledger postgresql+psycopg://postgres:***@127.0.0.1:1/nowhere is unavailable: it could not "
                              "be reached"), message
