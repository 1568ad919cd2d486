"""The train stage in several processes (torchrun, gloo on CPU), and what is refused before a charge.

The slow tests run the real stages on the sst2 smoke data with a tiny BERT: `torchrun` starts two
processes, each reads the records itself and samples its own shard; rank 0 answers in a file and
the parent settles from it. A process killed mid-run leaves the charge charged in full.
"""

import json
import os

import pytest

from dpops.errors import ConfigError, TrainingError
from dpops.ledger.states import COMMITTED, FAILED_CHARGED, RELEASED
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from dpops.train import distributed as launch
from tests.helpers import edit_yaml, policy_accepting_inconclusive
from tests.tiny_models import tiny_bert


def _ledger(workspace_env) -> Ledger:
    return Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")


def _two_process_job(path, base, nproc=2):
    edit_yaml(path, lambda d: d.update(
        model={"path": str(base), "max_length": 16}, training={"nproc_per_node": nproc}, train_max_records=64,
        eval_max_records=40, dp={**d["dp"], "steps": 3, "expected_batch_size": 16},
        audit={"canaries": 10},
    ))


def _reserved(job, project_root):
    ref = stages.resolve(str(job), str(project_root))
    plan = stages.plan(str(job), ref, policy_path=policy_accepting_inconclusive(job.parent))  # 10 canaries test nothing
    return ref, plan, stages.reserve(str(job), ref, plan)


@pytest.fixture
def importable_tests(monkeypatch, project_root):
    """torchrun's processes import ``tests.ddp_kill_worker`` from the project root."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(project_root), os.environ.get("PYTHONPATH")) if p))


def test_the_command_line_holds_references_only(tmp_path):
    cmd = launch.command(tmp_path / "request.json", 4)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in cmd and "--nproc_per_node=4" in cmd
    assert "--max-restarts=0" in cmd, "a restarted group would train again on data the charge paid for once"
    assert cmd[-4:] == ["-m", "dpops.pipeline.worker", "--request", str(tmp_path / "request.json")]


def test_nproc_per_node_is_validated_naming_file_and_field(smoke_job):
    from dpops.config import loading as config

    edit_yaml(smoke_job, lambda d: d.update(training={"nproc_per_node": 0}))
    with pytest.raises(ConfigError) as err:
        config.load_job_config(smoke_job)
    assert str(smoke_job) in str(err.value) and "field 'training.nproc_per_node'" in str(err.value)


@pytest.mark.parametrize("training,field", [({"nproc_per_node": 2}, "training.nproc_per_node"),
                                            ({"grad_sample_mode": "ghost"}, "training.grad_sample_mode")])
def test_user_level_settings_the_trainer_refuses_are_refused_at_stage_one(workspace_env, smoke_job, project_root, training, field):
    edit_yaml(smoke_job.parent.parent / "datasets/sst2.yaml", lambda d: d.update(unit="user", user_column="user", contribution_bound=5))
    edit_yaml(smoke_job, lambda d: d.update(training=training))
    with pytest.raises(ConfigError) as err:
        stages.resolve(str(smoke_job), str(project_root))
    assert str(smoke_job) in str(err.value) and f"field '{field}'" in str(err.value) and "unit 'user'" in str(err.value)
    assert not workspace_env.exists(), "nothing may be charged"


def test_more_gpu_processes_than_gpus_are_refused_before_the_charge_starts(workspace_env, smoke_job, project_root):
    edit_yaml(smoke_job, lambda d: d.update(training={"device": "cuda", "nproc_per_node": 64}, train_max_records=64))
    ref, plan, charge_id = _reserved(smoke_job, project_root)
    with pytest.raises(ConfigError, match="field 'training\\.(device|nproc_per_node)'.*Nothing was read or trained"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    charge = _ledger(workspace_env).charge(charge_id)
    assert charge.state == RELEASED and charge.charged is None
    assert not (workspace_env / "runs").exists()


@pytest.mark.slow
def test_two_processes_train_once_and_the_charge_commits_at_the_planned_steps(workspace_env, smoke_job, project_root, tmp_path):
    from pathlib import Path

    from dpops.assess import canaries

    _two_process_job(smoke_job, tiny_bert(tmp_path / "bert"))
    ref, plan, charge_id = _reserved(smoke_job, project_root)
    out = stages.train(str(smoke_job), ref, plan, charge_id)

    assert out["world_size"] == 2 and out["steps_run"] == plan["steps"] == 3
    ranks = sorted(out["ranks"], key=lambda r: r["rank"])
    assert [r["steps_run"] for r in ranks] == [3, 3]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"] == out["weights_sha256"], "the processes' weights diverged"
    assert [r["saved"] for r in ranks] == [True, False], "only rank 0 saves"
    run_dir = workspace_env / "runs" / charge_id
    assert [p.parent for p in run_dir.rglob("trainable.safetensors")] == [run_dir / "model"] == [Path(out["model_dir"])]
    assert out["canaries_path"] == str(run_dir / canaries.FILE)

    budget = stages.settle(charge_id, out["steps_run"])
    charge = _ledger(workspace_env).charge(charge_id)
    assert charge.state == COMMITTED and charge.steps_run == charge.mechanism.steps == 3 and budget["spent"] > 0
    events = [(e["event"], e["payload"]) for e in _ledger(workspace_env).history("sst2") if e["charge"] == charge_id]
    # rank 0 recorded the progress before step 1 (all 3 steps: fewer than 10); the stage, the accepted result
    assert events[1:] == [("running", {}), ("progress", {"steps_done": 3}), ("finished", {"steps_run": 3}),
                          ("committed", {"steps_run": 3})]
    metrics = stages.evaluate(str(smoke_job), ref, out["model_dir"])  # the saved model loads and predicts
    assert 0.0 <= metrics["accuracy"] <= 1.0

    # what travelled to the processes: references, never a record
    request = (run_dir / "launch" / launch.REQUEST).read_text()
    job, ds = stages._load(str(smoke_job))
    records = stages.training_records(job, ds, ref, plan, canaries.Canaries.load(run_dir / canaries.FILE),
                                      subset_key=bytes.fromhex(json.loads(request)["subset_key"]))
    assert len(records) >= 64 and not any(text in request for text in records["text"] if len(text) > 20)


@pytest.mark.slow
def test_a_killed_process_leaves_the_charge_charged_in_full(workspace_env, smoke_job, project_root, tmp_path, monkeypatch,
                                                            importable_tests):
    monkeypatch.setattr(launch, "WORKER_MODULE", "tests.ddp_kill_worker")
    _two_process_job(smoke_job, tiny_bert(tmp_path / "bert"))
    ref, plan, charge_id = _reserved(smoke_job, project_root)
    with pytest.raises(TrainingError, match="the training processes failed"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    ledger = _ledger(workspace_env)
    charge = ledger.charge(charge_id)
    assert charge.state == FAILED_CHARGED and charge.charged == charge.mechanism, "charged at its reserved size"
    kinds = [e["event"] for e in ledger.history("sst2") if e["charge"] == charge_id]
    assert "finished" not in kinds and ledger.progress(charge_id) == 3, "progress recorded ahead; no completed result"
    assert ledger.budget("sst2").spent > 0
    run_dir = workspace_env / "runs" / charge_id
    assert not (run_dir / "launch" / launch.RESULT).exists() and not (run_dir / "model").exists()
    with pytest.raises(Exception, match="cannot go from 'failed_charged'"):
        stages.settle(charge_id, plan["steps"])
