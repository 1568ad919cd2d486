"""Anchors: chain heads signed and kept outside the ledger's database catch what verify cannot.

T18 (a truncated tail), T19 (the whole chain rewritten consistently) and T25 (gate evidence edited,
chain rehashed) each leave a database whose rows agree with each other, so plain ``verify`` is
clean; the anchors written at commit, failure, evidence and gate decision are what catch them.
Every tamper goes through :func:`tests.helpers.tamper`; each case runs on SQLite and PostgreSQL.
"""

import json
import logging
import stat

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.errors import ConfigError
from dpops.ledger.anchors import AnchorLog, anchor_key, key_id, verify_anchors
from dpops.ledger.spend import _rdp_json
from dpops.ledger.store import Ledger
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian
from dpops.registry import gate
from tests.helpers import rehash_chain, tamper

RUN = SubsampledGaussian(1.0, 0.01, 500)
AUDIT = {"verdict": "FAIL", "reasons": ["canary audit: bound 4.1"]}
SHA = "ab" * 32
runner = CliRunner()


def _ledger(url: str, log: AnchorLog) -> Ledger:
    ledger = Ledger(url, anchors=log)
    ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=14.0)
    return ledger


def _committed(ledger: Ledger):
    c = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v")
    ledger.start(c.id)
    return ledger.commit(c.id, steps_run=RUN.steps)


def _gated(ledger: Ledger, charge_id: str, version: str = "1") -> None:
    """What the record stage and the gate append: binding, evidence (a failed audit), a refusal."""
    ledger.bind_model(charge_id, model_name="m", model_version=version, mlflow_run_id="run-1", artifact_sha256=SHA)
    ledger.record_evidence(charge_id, task="classification", figures={"accuracy": 0.5}, audit=AUDIT)
    ledger.record_decision("notes", decision={"charge_id": charge_id, "model": f"m/{version}", "decision": "REFUSED",
                                              "reasons": ["audit verdict FAIL"], "alias": None})


def _anchors(log: AnchorLog) -> list[dict]:
    return [json.loads(line) for _, line in log.lines()]


def _event_hash_at(ledger: Ledger, seq: int) -> str:
    with ledger.engine.connect() as conn:
        return conn.execute(text("SELECT hash FROM events WHERE seq = :s"), {"s": seq}).scalar_one()


@pytest.fixture
def log(tmp_path) -> AnchorLog:
    """An anchor log outside the database, signed under the workspace's key (created on first use)."""
    return AnchorLog(tmp_path / "anchors" / "anchors.jsonl")


# ----------------------------------------------------------------- what is written


def test_an_honest_ledger_verifies_against_its_anchors(ledger_url, log):
    ledger = _ledger(ledger_url, log)
    c = _committed(ledger)
    _gated(ledger, c.id)
    dead = ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v")
    ledger.start(dead.id)
    ledger.record_progress(dead.id, steps_done=10)
    ledger.fail(dead.id, reason="killed")
    ledger.reserve(dataset="notes", mechanism=RUN, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v")

    kinds = {e["seq"]: e["event"] for e in ledger.history("notes")}
    anchors = _anchors(log)
    # one anchor per commit, evidence, decision and failure, each naming its own event; none for the rest
    assert [(a["seq"], a["kind"]) for a in anchors] == [
        (seq, kind) for seq, kind in kinds.items() if kind in ("committed", "evidence", "gate_decision", "failed_charged")]
    assert len(anchors) == 4 and all(a["head"] == _event_hash_at(ledger, a["seq"]) for a in anchors)
    assert max(kinds) > anchors[-1]["seq"]  # events after the last anchor are fine
    assert ledger.verify() == [] and verify_anchors(ledger, log) == []


def test_the_key_file_is_created_private_and_the_env_key_overrides_it(tmp_path, workspace_env, monkeypatch):
    ledger = _ledger(f"sqlite:///{tmp_path / 'ledger.db'}", AnchorLog.for_workspace())
    _committed(ledger)
    key_file = workspace_env / "anchor.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key_file.read_bytes()) == 32
    (anchor,) = _anchors(AnchorLog(workspace_env / "anchors.jsonl"))
    assert anchor["key_id"] == key_id(key_file.read_bytes())

    monkeypatch.setenv("DPOPS_ANCHOR_KEY", "11" * 32)
    assert anchor_key() == bytes.fromhex("11" * 32)
    monkeypatch.setenv("DPOPS_ANCHOR_KEY", "not hex")
    with pytest.raises(ConfigError, match="DPOPS_ANCHOR_KEY must be 64 hex digits"):
        anchor_key()


def test_a_failed_anchor_write_keeps_the_ledgers_write_and_says_the_anchor_is_missing(tmp_path, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    ledger = _ledger(f"sqlite:///{tmp_path / 'ledger.db'}", AnchorLog(blocker / "anchors.jsonl"))
    with caplog.at_level(logging.WARNING, logger="dpops.ledger"):
        c = _committed(ledger)
    assert ledger.charge(c.id).state == "committed" and ledger.verify() == []
    assert any("event 4 (committed) is committed, but its anchor is missing" in r.getMessage() for r in caplog.records)


#: One writer process: appends ``n`` anchors as fast as it can (argv: path, key hex, worker, n).
WRITER = """
import sys
from dpops.ledger.anchors import AnchorLog
path, key, worker, n = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = AnchorLog(path, key=key)
for i in range(n):
    log.append(f"dataset-{worker}", i + 1, f"{worker:x}" * 64, "committed")
"""


def test_concurrent_writers_never_interleave_lines(tmp_path):
    import os
    import subprocess
    import sys

    path, key, n = str(tmp_path / "anchors.jsonl"), bytes(range(32)), 300
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    workers = [subprocess.Popen([sys.executable, "-c", WRITER, path, key.hex(), str(w), str(n)], env=env) for w in range(4)]
    assert [p.wait(60) for p in workers] == [0] * 4
    log = AnchorLog(path, key=key)
    lines = log.lines()
    assert len(lines) == 4 * n
    # every line is whole: it parses, and its MAC holds (the datasets are unknown to this empty ledger)
    problems = verify_anchors(Ledger(f"sqlite:///{tmp_path / 'empty.db'}"), log)
    assert len(problems) == 4 * n and all("the ledger holds no such dataset" in p for p in problems), problems[:3]


# ----------------------------------------------------------------- the anchor log's own integrity


def test_an_edited_anchor_line_fails_its_mac(ledger_url, log):
    ledger = _ledger(ledger_url, log)
    _committed(ledger)
    _committed(ledger)
    lines = log.path.read_text().splitlines()
    edited = json.loads(lines[1])
    edited["seq"] = 2  # re-point the second anchor at an earlier event, keeping its MAC
    log.path.write_text("\n".join([lines[0], json.dumps(edited), "{torn"]) + "\n")
    problems = verify_anchors(ledger, log)
    assert len(problems) == 2, problems
    assert "line 2: bad MAC: the anchor was edited or forged" in problems[0]
    assert "line 3: not a signed anchor" in problems[1]


def test_a_wrong_key_is_reported_as_such(ledger_url, log, tmp_path, monkeypatch):
    ledger = _ledger(ledger_url, log)
    _committed(ledger)
    _committed(ledger)
    other = AnchorLog(log.path, key=bytes(32))
    problems = verify_anchors(ledger, other)
    assert problems == [f"anchor log {log.path}: line(s) 1, 2 are signed under key id {key_id(log.key())}, not under this "
                        f"key (key id {key_id(bytes(32))}): a wrong DPOPS_ANCHOR_KEY or anchor.key, or forged lines"]
    # a workspace without the key: verify refuses rather than create a fresh key that matches nothing
    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "other-home"))
    with pytest.raises(ConfigError, match="no anchor key"):
        verify_anchors(ledger, AnchorLog(log.path))
    assert not (tmp_path / "other-home" / "anchor.key").exists()


# ----------------------------------------------------------------- the tamper cases only anchors catch


def _truncate_last_run(ledger: Ledger, charge_id: str) -> None:
    """T18: erase the last run entirely (its events, rows and spend) and roll the chain head back."""
    tamper(ledger, "DELETE FROM events WHERE charge_id = :c", {"c": charge_id})
    tamper(ledger, "DELETE FROM charge_states WHERE charge_id = :c", {"c": charge_id})
    tamper(ledger, "DELETE FROM charges WHERE id = :c", {"c": charge_id})
    tamper(ledger, "UPDATE spend_totals SET steps = steps - :s", {"s": RUN.steps})
    rehash_chain(ledger, "notes")  # nothing before it changed: this sets the head back to the new last event


def test_T18_a_truncated_tail_is_caught_by_the_anchors(ledger_url, log):
    ledger = _ledger(ledger_url, log)
    _committed(ledger)
    last = _committed(ledger)  # events 5-7
    spent = ledger.budget("notes").spent
    assert verify_anchors(ledger, log) == []
    _truncate_last_run(ledger, last.id)
    assert ledger.budget("notes").spent < spent  # what admission sees: the run's spend is gone
    assert ledger.verify() == []  # the database alone shows nothing
    problems = verify_anchors(ledger, log)
    assert len(problems) == 1 and "dataset 'notes': anchored at seq 7 (committed" in problems[0], problems
    assert "its chain ends at seq 4: events were deleted from its tail (truncated)" in problems[0]


def test_T19_a_chain_rewritten_at_another_sigma_is_caught_by_the_anchors(ledger_url, log):
    ledger = _ledger(ledger_url, log)
    _committed(ledger)
    spent = ledger.budget("notes").spent
    tamper(ledger, "UPDATE charges SET noise_multiplier = 2.0")
    tamper(ledger, "UPDATE events SET payload = REPLACE(payload, :a, :b) WHERE kind = 'reserved'",
           {"a": '"noise_multiplier":1.0', "b": '"noise_multiplier":2.0'})
    tamper(ledger, "UPDATE spend_totals SET noise_multiplier = 2.0, rdp_per_step = :c", {"c": _rdp_json(filters.GRID_FILTER, 2.0, 0.01)})
    rehash_chain(ledger, "notes")
    assert ledger.budget("notes").spent < spent / 2  # re-stated at twice the noise
    assert ledger.verify() == []
    problems = verify_anchors(ledger, log)
    assert len(problems) == 1 and "dataset 'notes': anchored at seq 4 (committed" in problems[0], problems
    assert "but event 4 now hashes to" in problems[0] and "the chain up to it was rewritten" in problems[0]


def test_T25_gate_evidence_edited_and_rehashed_is_caught_by_the_anchors(ledger_url, log):
    ledger = _ledger(ledger_url, log)
    c = _committed(ledger)
    _gated(ledger, c.id)  # events 5 (model_bound), 6 (evidence), 7 (gate_decision)
    tamper(ledger, "UPDATE events SET payload = REPLACE(REPLACE(payload, :a, :b), :c, :d) WHERE kind = 'evidence'",
           {"a": '"accuracy":0.5', "b": '"accuracy":0.99', "c": '"verdict":"FAIL"', "d": '"verdict":"PASS"'})
    rehash_chain(ledger, "notes")
    record = gate.evidence(ledger, c.id).record
    assert record["accuracy"] == 0.99 and record["audit"]["verdict"] == "PASS"  # what the gate would now read
    assert ledger.verify() == []
    problems = verify_anchors(ledger, log)
    assert [p.split(" (")[0] for p in problems] == ["dataset 'notes': anchored at seq 6", "dataset 'notes': anchored at seq 7"]
    assert all("the chain up to it was rewritten" in p for p in problems), problems
    assert gate.ledger_problems(ledger) == problems  # the gate and serving refuse it too
    assert gate.ledger_problems(Ledger(ledger.url)) == []  # (a ledger opened without its anchors cannot tell)


# ----------------------------------------------------------------- the command line


def test_cli_verify_checks_the_workspace_anchors_and_another_log(ledger_url, workspace_env, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    workspace_env.mkdir(parents=True)
    ledger = _ledger(ledger_url, AnchorLog.for_workspace())  # what the stages and the CLI write to
    _committed(ledger)
    last = _committed(ledger)
    elsewhere = tmp_path / "copy.jsonl"
    elsewhere.write_bytes((workspace_env / "anchors.jsonl").read_bytes())

    honest = runner.invoke(app, ["ledger", "verify"])
    assert honest.exit_code == 0 and f"2 anchor(s) in {workspace_env / 'anchors.jsonl'} match" in honest.output, honest.output
    assert runner.invoke(app, ["ledger", "verify", "--anchors", str(elsewhere)]).exit_code == 0

    _truncate_last_run(ledger, last.id)
    (workspace_env / "anchors.jsonl").unlink()  # the workspace's copy lost too: the database alone looks fine
    assert ledger.verify() == []
    alone = runner.invoke(app, ["ledger", "verify"])
    assert alone.exit_code == 0 and "no anchor log" in alone.output, alone.output
    assert "warning: no anchor log" in alone.output and "cannot be detected" in alone.output  # said, not silent
    caught = runner.invoke(app, ["ledger", "verify", "--anchors", str(elsewhere)])
    assert caught.exit_code == 1 and "events were deleted from its tail (truncated)" in caught.output, caught.output

    monkeypatch.setenv("DPOPS_ANCHOR_LOG", str(elsewhere))  # the workspace's log, named by the environment
    assert runner.invoke(app, ["ledger", "verify"]).exit_code == 1
    missing = runner.invoke(app, ["ledger", "verify", "--anchors", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "no such anchor log" in missing.output
    bare = runner.invoke(app, ["ledger", "verify", "--anchors"])
    assert bare.exit_code == 2 and "requires an argument" in bare.output


# ----------------------------------------------------------------- MLflow copies (the stages)


def test_the_stages_tag_mlflow_with_the_chain_heads(workspace_env, workspace_ledger, smoke_job, tmp_path, project_root,
                                                   monkeypatch):
    """The record stage tags the run with ``dpops.chain_head`` (after the evidence) and the gate tags the
    version with ``dpops.gate_chain_head`` (after its decision), each the head the anchor signs."""
    import mlflow

    from dpops.pipeline import publish
    from dpops.registry import tracking

    workspace_env.mkdir(parents=True)
    uri = f"sqlite:///{workspace_env / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    ledger = workspace_ledger(dataset="notes", unit="record", delta=1e-5, epsilon_cap=14.0)
    c = _committed(ledger)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    client.create_registered_model("m")
    version = client.create_model_version("m", source=(tmp_path / "art").as_uri(), run_id=run_id).version
    client.set_model_version_tag("m", version, "dpops.charge_id", c.id)
    monkeypatch.setattr(tracking, "record", lambda ws, **kw: tracking.RecordResult(run_id, exp, "m", str(version)))
    monkeypatch.setattr(tracking, "weights_sha256", lambda model_dir: SHA)

    ref = {"dataset": "notes", "rev": "r", "path": "p", "fingerprint": "f", "n_records": 10_000, "version": "v", "repo": "."}
    train_out = {"epsilon_by_step": [], "steps_run": RUN.steps, "seconds": 1.0, "grad_sample_mode": "hooks",
                 "trainable_parameters": 1, "model_dir": str(tmp_path)}
    audit_out = {"verdict": "PASS", "reasons": [], "decided_by": "black-box canaries", "claimed_epsilon": 1.0,
                 "ceiling": 3.0, "canary_epsilon_lower_bound": 0.1, "canary_ceiling": 3.0, "white_box_epsilon_lower_bound": 0.0,
                 "white_box_ceiling": 0.0, "noise_multiplier_upper": None, "mia_epsilon_lower_bound": 0.0,
                 "cross_check_ok": True, "accountant_epsilon": 1.0, "outcomes": {}, "mechanism": {}}
    publish.record(str(smoke_job), ref, {"delta": 1e-5}, c.id, train_out, {"accuracy": 0.9}, audit_out)
    publish.promote(str(project_root / "configs/policy.yaml"), "m", str(version))

    evidence, decision = _anchors(AnchorLog.for_workspace())[-2:]
    assert (evidence["kind"], decision["kind"]) == ("evidence", "gate_decision")
    assert client.get_run(run_id).data.tags["dpops.chain_head"] == f"notes:{evidence['seq']}:{evidence['head']}"
    assert client.get_model_version("m", version).tags["dpops.gate_chain_head"] == f"notes:{decision['seq']}:{decision['head']}"
    assert decision["head"] == _event_hash_at(ledger, decision["seq"])
    assert verify_anchors(ledger, AnchorLog.for_workspace()) == []
