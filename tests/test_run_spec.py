"""One run, one configuration: the digest of the job and dataset configs is stored on the charge,
and training refuses configs edited after the reservation (in the stage and in every torchrun process)."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from dpops.config.spec import RunSpec
from dpops.errors import ConfigError, PrivacyError
from dpops.ledger.states import RELEASED, RESERVED, RUNNING
from dpops.pipeline import stages, worker
from dpops.privacy.accounting import SubsampledGaussian
from tests.helpers import edit_yaml


def test_the_digest_covers_both_configs_not_their_layout(smoke_job):
    first = RunSpec.load(smoke_job)
    assert first.digest == RunSpec.load(smoke_job).digest and first.digest.startswith("sha256:")
    # Same configuration, written differently (key order, a comment): same digest.
    data = yaml.safe_load(smoke_job.read_text())
    smoke_job.write_text("# a comment\n" + yaml.safe_dump(dict(reversed(list(data.items())))))
    assert RunSpec.load(smoke_job).digest == first.digest
    # Any figure of the job, or of its dataset, moves it.
    edit_yaml(smoke_job, lambda d: d.update(seed=d.get("seed", 0) + 1))
    second = RunSpec.load(smoke_job)
    assert second.digest != first.digest
    edit_yaml(smoke_job.parent.parent / "datasets/sst2.yaml", lambda d: d["privacy"].update(epsilon_cap=d["privacy"]["epsilon_cap"] + 1))
    assert RunSpec.load(smoke_job).digest not in (first.digest, second.digest)


def test_a_spec_is_frozen(smoke_job):
    spec = RunSpec.load(smoke_job)
    with pytest.raises(ValidationError):
        spec.job_path = "other.yaml"


def test_a_missing_job_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: no such file; expected a job file"):
        RunSpec.load(tmp_path / "nope.yaml")


def test_the_ledger_keeps_the_digest_on_the_charge_and_in_its_reserved_event(make_ledger):
    ledger = make_ledger(dataset="d", unit="record", delta=1e-5, epsilon_cap=10.0, contribution_bound=None)
    digest = "sha256:" + "ab" * 32
    charge = ledger.reserve(dataset="d", mechanism=SubsampledGaussian(1.0, 0.01, 10), max_grad_norm=1.0,
                            n_records=1000, job="j", data_version="v", spec_hash=digest)
    assert charge.spec_hash == digest and ledger.charge(charge.id).spec_hash == digest
    [reserved] = [e for e in ledger.history("d") if e["event"] == RESERVED]
    assert reserved["payload"]["spec_hash"] == digest
    assert ledger.verify() == []
    with pytest.raises(ConfigError, match="field 'spec_hash'"):
        ledger.reserve(dataset="d", mechanism=SubsampledGaussian(1.0, 0.01, 10), max_grad_norm=1.0,
                       n_records=1000, job="j", data_version="v", spec_hash="md5:0")
    ledger.dispose()


EDITS = {
    "learning rate": lambda d: d.setdefault("optim", {}).update(learning_rate=0.5),
    "seed": lambda d: d.update(seed=d.get("seed", 0) + 7),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_the_train_stage_refuses_a_job_edited_after_the_reservation_and_releases_it(workspace_env, workspace_ledger, smoke_job,
                                                                                   project_root, forbid_reading, edit):
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    ledger = workspace_ledger()
    assert ledger.charge(charge_id).spec_hash == RunSpec.load(smoke_job).digest
    edit_yaml(smoke_job, edit)  # between plan/reserve and train: what a later edit, or another checkout, does
    forbid_reading()
    with pytest.raises(ConfigError, match=rf"config changed after charge {charge_id} was reserved .*Nothing was read or "
                                          "trained; the reservation was released"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    charge = ledger.charge(charge_id)
    assert charge.state == RELEASED and charge.charged is None
    assert ledger.verify() == [] and not (workspace_env / "runs").exists()


def test_a_worker_refuses_configs_edited_after_the_reservation(workspace_env, workspace_ledger, smoke_job, project_root,
                                                               tmp_path, monkeypatch, forbid_reading):
    import torch

    joined = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: joined.append(1) or 1 / 0)
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    ledger = workspace_ledger()
    ledger.start(charge_id)
    edit_yaml(smoke_job, EDITS["learning rate"])
    forbid_reading()
    request = json.loads(json.dumps({"job_path": str(smoke_job), "ref": ref, "plan": plan, "charge_id": charge_id,
                                     "canaries_path": str(tmp_path / "c.json"), "output_dir": str(tmp_path / "model"),
                                     "result_path": str(tmp_path / "result.json")}))
    with pytest.raises(PrivacyError, match=f"config changed after charge {charge_id} was reserved"):
        worker.run_worker(request)
    assert joined == [] and ledger.charge(charge_id).state == RUNNING  # charged in full: the parent fails it
