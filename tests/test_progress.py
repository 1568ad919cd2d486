"""Progress is recorded before the steps it announces, so a run that dies is never settled below what it ran.

The train stage, with a tiny BERT on the sst2 smoke data, on SQLite and PostgreSQL ledgers: the
recorder writes, before each chunk of steps, the steps the run will have taken at its end; the
stage writes the trainer's completed result (``finished``) once it returned; ``settle`` below the
reserved steps is accepted only at exactly that result. A process that dies (simulated: the
stage's ``fail`` never runs, as under SIGKILL) leaves a running charge whose progress is at least
the steps it took, and which can be settled only at its reserved steps.
"""

import shutil

import pytest

from dpops.errors import LedgerError
from dpops.ledger.states import COMMITTED, RUNNING
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from dpops.train import private_step
from tests.conftest import ROOT
from tests.helpers import edit_yaml, policy_accepting_inconclusive
from tests.tiny_models import tiny_bert

STEPS, EVERY = 5, 2
#: One fingerprint key for the module: the data is resolved once, then read in each test's workspace.
KEY = "5e" * 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The smoke job on a tiny BERT and 64 records, resolved and planned once (no ledger needed)."""
    root = tmp_path_factory.mktemp("progress")
    shutil.copytree(ROOT / "configs", root / "configs")
    job = root / "configs" / "jobs" / "sst2_smoke.yaml"
    base = tiny_bert(root / "bert")
    edit_yaml(job, lambda d: d.update(
        model={"path": str(base), "max_length": 16}, train_max_records=64, eval_max_records=40,
        dp={**d["dp"], "steps": STEPS, "expected_batch_size": 16}, audit={"canaries": 10},
    ))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPOPS_FINGERPRINT_KEY", KEY)
        mp.setenv("DPOPS_HOME", str(root / "dpops-home"))
        ref = stages.resolve(str(job), str(ROOT))
    return str(job), ref, stages.plan(str(job), ref, policy_path=policy_accepting_inconclusive(job.parent))


@pytest.fixture
def stage_ledger(ledger_url, tmp_path, monkeypatch):
    """The stages' workspace under tmp_path, its ledger at ``ledger_url``; progress every 2 steps."""
    monkeypatch.setenv("DPOPS_HOME", str(tmp_path / "dpops-home"))
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    monkeypatch.setenv("DPOPS_FINGERPRINT_KEY", KEY)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(stages, "PROGRESS_EVERY", EVERY)
    return ledger_url


def _count_steps(monkeypatch, *, die_at=None) -> list[int]:
    """Count the noisy steps the trainer completes; with ``die_at``, raise in that step instead."""
    real, taken = private_step.noisy_step, []

    def step(*args, **kwargs):
        if len(taken) + 1 == die_at:
            raise RuntimeError("killed")
        out = real(*args, **kwargs)
        taken.append(1)
        return out

    monkeypatch.setattr(private_step, "noisy_step", step)
    return taken


def test_progress_is_recorded_before_each_chunk_and_the_run_settles_at_the_planned_steps(stage_ledger, prepared, monkeypatch):
    job, ref, plan = prepared
    taken, recorded = _count_steps(monkeypatch), []
    real = Ledger.record_progress

    def spy(self, charge_id, *, steps_done):
        recorded.append((len(taken), steps_done))
        real(self, charge_id, steps_done=steps_done)

    monkeypatch.setattr(Ledger, "record_progress", spy)
    charge_id = stages.reserve(job, ref, plan)
    out = stages.train(job, ref, plan, charge_id)
    assert recorded == [(0, 2), (2, 4), (4, 5)], "(steps taken, steps recorded): recorded ahead, capped at the plan"
    stages.settle(charge_id, out["steps_run"])
    ledger = Ledger(stage_ledger)
    events = [e for e in ledger.history("sst2") if e["charge"] == charge_id]
    assert [e["event"] for e in events] == ["reserved", "running", "progress", "progress", "progress", "finished", "committed"]
    assert events[5]["payload"] == {"steps_run": STEPS} and out["steps_run"] == plan["steps"] == STEPS
    charge = ledger.charge(charge_id)
    assert charge.state == COMMITTED and charge.steps_run == STEPS
    assert ledger.verify() == []


@pytest.mark.parametrize("where,k", [("in a step", 3), ("in on_step", 2)])
def test_a_run_killed_after_k_steps_leaves_progress_of_at_least_k_and_settles_only_in_full(
    stage_ledger, prepared, monkeypatch, where, k
):
    job, ref, plan = prepared
    if where == "in a step":  # step k + 1 dies mid-chunk (progress 4 was recorded before step 3)
        taken = _count_steps(monkeypatch, die_at=k + 1)
    else:  # the progress call before step k + 1 (a chunk's first) dies, e.g. the ledger is unreachable
        taken = _count_steps(monkeypatch)
        recorder = stages.progress_recorder

        def dying_recorder(*args, **kwargs):
            on_step = recorder(*args, **kwargs)

            def call(step):
                if step == k + 1:
                    raise RuntimeError("killed")
                on_step(step)
            return call

        monkeypatch.setattr(stages, "progress_recorder", dying_recorder)
    monkeypatch.setattr(Ledger, "fail", lambda self, charge_id, *, reason: None)  # killed: the stage never marks it failed
    charge_id = stages.reserve(job, ref, plan)
    with pytest.raises(RuntimeError, match="killed"):
        stages.train(job, ref, plan, charge_id)
    assert len(taken) == k
    ledger = Ledger(stage_ledger)
    assert ledger.charge(charge_id).state == RUNNING
    assert ledger.progress(charge_id) >= k
    for steps in range(STEPS):  # below the reserved steps: no completed result, and some below the progress
        with pytest.raises(LedgerError, match="progress events record|completed result"):
            stages.settle(charge_id, steps)
    stages.settle(charge_id, STEPS)  # in full: what a run that died counts anyway
    assert ledger.charge(charge_id).steps_run == STEPS
    assert ledger.verify() == []
