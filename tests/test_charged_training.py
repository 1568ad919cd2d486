"""The mechanism trained is the mechanism charged, and only public data is trained on uncharged.

`training.train` runs DP-SGD on a non-public dataset only under a `running` ledger charge whose
mechanism is its plan's; the train stage compares the plan it is handed with the charge before the
charge starts, and every torchrun worker compares its request's plan with the ledger before it reads
a record. Without a charge, or without noise, only a dataset whose config says `public: true`.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from dpops.config.loading import load_dataset_config
from dpops.config.schema import JobConfig
from dpops.errors import PrivacyError
from dpops.ledger.states import PROGRESS, RELEASED, RESERVED, RUNNING
from dpops.ledger.store import Ledger
from dpops.models import hf as modeling
from dpops.pipeline import planning as privacy
from dpops.pipeline import stages, worker
from dpops.privacy.plan import Plan
from dpops.train import trainer as training
from tests.helpers import edit_yaml, policy_accepting_inconclusive, public_dataset

TEXTS = ["a fine film", "dull and slow", "yes", "the cast is superb", "no", "an odd little thing"]


def _job() -> JobConfig:
    return JobConfig(name="j", dataset="d", registered_model="m", dp={"target_epsilon": 8})


def _plan(**change) -> Plan:
    p = Plan(dataset="d", n_records=24, sample_rate=0.25, expected_batch_size=6.0, steps=3, noise_multiplier=1.0,
             max_grad_norm=1.0, delta=1e-3, target_epsilon=8.0, epsilon=8.0)
    return dataclasses.replace(p, **change)


@pytest.fixture
def no_model(monkeypatch):
    """A refused run must stop before the model is even built."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was built: the run was not refused first")

    monkeypatch.setattr(modeling, "build", refuse)
    monkeypatch.setattr(modeling, "load_tokenizer", refuse)


@pytest.fixture
def ledger(make_ledger):
    """Dataset ``d`` (record, delta 1e-3, cap 100; overrides the shared ``ledger``)."""
    return make_ledger(dataset="d", unit="record", delta=1e-3, epsilon_cap=100.0, contribution_bound=None)


def _charge(ledger: Ledger, *, start: bool = True):
    charge = privacy.reserve(ledger, _plan(), job="j", data_version="v1")
    return ledger.start(charge.id) if start else charge


def _records() -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS * 4, "label": [1, 0] * 12})


# --------------------------------------------------------------------------- the library


@pytest.mark.parametrize("sigma", [1.0, 0.0])
def test_training_a_private_dataset_without_a_charge_is_refused_naming_the_field(tmp_path, no_model, sigma):
    private = public_dataset(public=False)
    with pytest.raises(PrivacyError, match=r"dataset 'd' is not public \(dataset config field 'public' is false\)"):
        training.train(_job(), _plan(noise_multiplier=sigma), _records(), dataset=private, labels=["0", "1"],
                       output_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_the_shipped_stand_ins_are_public_and_the_default_is_not(project_root):
    for name in ("sst2", "medical_abstracts", "twitter_financial_news"):
        assert load_dataset_config(project_root / f"configs/datasets/{name}.yaml").public is True
    assert public_dataset(public=False).public is False
    fields = public_dataset().model_dump()
    fields.pop("public")
    assert type(public_dataset())(**fields).public is False, "a dataset is private unless its config says otherwise"


def test_a_public_dataset_may_be_trained_on_uncharged_and_without_noise():
    training.authorize(_job(), _plan(noise_multiplier=0.0), public_dataset(), None, unit="record")
    training.authorize(_job(), _plan(), public_dataset(), None, unit="record")


def test_noise_multiplier_zero_under_a_charge_is_refused(tmp_path, ledger, no_model):
    charge = _charge(ledger)
    for dataset in (public_dataset(public=False), public_dataset()):
        with pytest.raises(PrivacyError, match=f"charge {charge.id}: noise multiplier 0 is not DP-SGD"):
            training.train(_job(), _plan(noise_multiplier=0.0), _records(), dataset=dataset, charge=charge,
                           labels=["0", "1"], output_dir=tmp_path / "m")


def test_a_charge_that_is_not_running_is_refused(tmp_path, ledger, no_model):
    reserved = _charge(ledger, start=False)
    with pytest.raises(PrivacyError, match=f"charge {reserved.id} is 'reserved', not 'running'"):
        training.train(_job(), _plan(), _records(), dataset=public_dataset(public=False), charge=reserved,
                       labels=["0", "1"], output_dir=tmp_path / "m")


TAMPERED = {
    "sigma halved": ({"noise_multiplier": 0.5}, "noise_multiplier 0.5 (charged: 1.0)"),
    "q doubled": ({"sample_rate": 0.5, "expected_batch_size": 12.0}, "sample_rate 0.5 (charged: 0.25)"),
    "steps raised": ({"steps": 4}, "steps 4 (charged: 3)"),
    "C doubled": ({"max_grad_norm": 2.0}, "max_grad_norm 2.0 (charged: 1.0)"),
    "n lowered": ({"n_records": 20, "expected_batch_size": 5.0}, "n_records 20 (charged: 24)"),
    "blocks": ({"blocks": ["2026-01"]}, "blocks ['2026-01'] (charged: [])"),
    "batch size": ({"expected_batch_size": 60.0}, "expected_batch_size 60.0"),
    "other dataset": ({"dataset": "e"}, "the plan is for dataset 'e'"),
}


@pytest.mark.parametrize("change,named", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_plan_that_differs_from_the_running_charge_is_refused(tmp_path, ledger, no_model, change, named):
    charge = _charge(ledger)
    with pytest.raises(PrivacyError, match="Nothing was trained") as err:
        training.train(_job(), _plan(**change), _records(), dataset=public_dataset(public=False), charge=charge,
                       labels=["0", "1"], output_dir=tmp_path / "m")
    assert named in str(err.value)


def test_records_that_name_users_do_not_train_under_a_record_level_charge(tmp_path, ledger, no_model):
    charge = _charge(ledger)
    with pytest.raises(PrivacyError, match=r"unit 'user' \(charged: 'record'\)"):
        training.train(_job(), _plan(), _records().assign(user="u"), dataset=public_dataset(public=False), charge=charge,
                       labels=["0", "1"], output_dir=tmp_path / "m")


# --------------------------------------------------------------------------- the train stage and its workers


def _tamper(p: dict, how: str) -> dict:
    p = dict(p)
    if how == "sigma halved":
        p["noise_multiplier"] /= 2
    elif how == "q doubled":
        p["sample_rate"] *= 2
        p["expected_batch_size"] *= 2
    elif how == "steps raised":
        p["steps"] += 10
    elif how == "delta raised":
        p["delta"] *= 10
    return p


@pytest.mark.parametrize("how", ["sigma halved", "q doubled", "steps raised", "delta raised"])
def test_the_train_stage_refuses_a_plan_it_was_not_charged_for_and_releases_it(workspace_env, workspace_ledger, smoke_job,
                                                                                 project_root, forbid_reading, how):
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    forbid_reading()
    with pytest.raises(PrivacyError, match=rf"not what charge {charge_id} admitted: .*Nothing was read or trained; "
                                           "the reservation was released"):
        stages.train(str(smoke_job), ref, _tamper(plan, how), charge_id)
    ledger = workspace_ledger()
    charge = ledger.charge(charge_id)
    assert charge.state == RELEASED and charge.charged is None
    assert all(c.state != RUNNING for c in ledger.charges("sst2"))
    [released] = [e for e in ledger.history("sst2") if e["event"] == RELEASED]
    assert "not what charge" in released["payload"]["reason"]
    assert ledger.verify() == [] and not (workspace_env / "runs").exists()


def _request(job_path, ref, plan, charge_id, tmp_path) -> dict:
    return {"job_path": str(job_path), "ref": ref, "plan": plan, "charge_id": charge_id,
            "canaries_path": str(tmp_path / "canaries.json"), "output_dir": str(tmp_path / "model"),
            "result_path": str(tmp_path / "result.json")}


@pytest.mark.parametrize("how", ["sigma halved", "q doubled", "steps raised", "delta raised"])
def test_a_worker_refuses_a_request_whose_plan_is_not_the_running_charge(workspace_env, workspace_ledger, smoke_job,
                                                                          project_root, tmp_path, monkeypatch, forbid_reading,
                                                                          how):
    import torch

    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joined.append(1) or 1 / 0)
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    ledger = workspace_ledger()
    ledger.start(charge_id)  # what the parent does before it starts torchrun
    forbid_reading()
    request = json.loads(json.dumps(_request(smoke_job, ref, _tamper(plan, how), charge_id, tmp_path)))
    with pytest.raises(PrivacyError, match=f"the plan differs from what charge {charge_id} admitted"):
        worker.run_worker(request)
    assert joined == [], "refused before joining the group, let alone reading a record"
    # Still running, never committed: the parent marks it failed_charged, charged in full.
    assert ledger.charge(charge_id).state == RUNNING
    assert not [e for e in ledger.history("sst2") if e["event"] == PROGRESS]
    # The same request with the charged plan passes the check and goes on to join the group.
    with pytest.raises(ZeroDivisionError):
        worker.run_worker(_request(smoke_job, ref, plan, charge_id, tmp_path))
    assert joined == [1]


def test_a_worker_refuses_a_charge_that_is_not_running(workspace_env, smoke_job, project_root, tmp_path, forbid_reading):
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    forbid_reading()
    with pytest.raises(PrivacyError, match=f"charge {charge_id} is 'reserved', not 'running'"):
        worker.run_worker(_request(smoke_job, ref, plan, charge_id, tmp_path))
    assert Ledger(f"sqlite:///{workspace_env / 'ledger.db'}").charge(charge_id).state == RESERVED


def test_a_private_dataset_is_trained_only_under_its_charge_at_the_stage(workspace_env, smoke_job, project_root):
    """The pipeline on a dataset that is not public still trains: the stage hands the running charge."""
    edit_yaml(smoke_job.parent.parent / "datasets/sst2.yaml", lambda d: d.update(public=False))
    edit_yaml(smoke_job, lambda d: d.update(train_max_records=64, dp={**d["dp"], "steps": 1, "expected_batch_size": 16},
                                            audit={"canaries": 10}))
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref, policy_path=policy_accepting_inconclusive(smoke_job.parent))
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    out = stages.train(str(smoke_job), ref, plan, charge_id)
    assert out["steps_run"] == 1
