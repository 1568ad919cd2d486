"""Stage functions without Prefect: the charge of a run that dies after reading data stays."""


import pytest

from dpops.errors import ConfigError, DataValidationError
from dpops.ledger.states import FAILED_CHARGED
from dpops.pipeline import stages
from tests.helpers import edit_yaml, policy_accepting_inconclusive


def test_run_that_dies_after_reading_data_stays_charged(workspace_env, workspace_ledger, smoke_job, project_root, monkeypatch):
    from dpops.models import hf

    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    read = []
    real_records = stages.training_records
    monkeypatch.setattr(stages, "training_records", lambda *a, **k: read.append(1) or real_records(*a, **k))

    def broken_build(*args, **kwargs):  # what a model the preflight passed but the trainer cannot build does
        raise ValueError("no_such_module")

    monkeypatch.setattr(hf, "build", broken_build)
    with pytest.raises(ValueError, match="no_such_module"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    assert read == [1], "the records were read before the model failed"
    ledger = workspace_ledger()
    assert ledger.charge(charge_id).state == FAILED_CHARGED
    assert ledger.budget("sst2").spent > 0


def test_progress_is_recorded_and_a_run_dying_mid_way_stays_charged_in_full(workspace_env, workspace_ledger, smoke_job,
                                                                            project_root, monkeypatch):
    from dpops.train import private_step

    monkeypatch.setattr(stages, "PROGRESS_EVERY", 2)
    real, calls = private_step.noisy_step, []

    def dies_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("worker lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(private_step, "noisy_step", dies_at_step_4)
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    with pytest.raises(RuntimeError, match="worker lost"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    ledger = workspace_ledger()
    events = [e for e in ledger.history("sst2") if e["charge"] == charge_id]
    assert [e["event"] for e in events] == ["reserved", "running", "progress", "progress", "failed_charged"]
    assert [e["payload"] for e in events[2:4]] == [{"steps_done": 2}, {"steps_done": 4}]  # before steps 1 and 3
    # Died after 3 steps, recorded 4: still charged at the 5 reserved steps (data was read).
    assert [m.steps for m in ledger.counted("sst2")] == [plan["steps"]] == [5]
    assert ledger.verify() == []


@pytest.mark.parametrize("mode", ["ghost", "bk"])
def test_per_layer_clipping_on_tied_weights_is_refused_at_stage_one(workspace_env, smoke_job, project_root, tmp_path, mode):
    from tests.tiny_models import tiny_llama

    base = tiny_llama(tmp_path / "tied", tie_word_embeddings=True)
    edit_yaml(smoke_job, lambda d: d.update(task="causal_lm", method="full", model={"path": str(base), "max_length": 16},
                                        training={"grad_sample_mode": mode}))
    with pytest.raises(ConfigError, match=r"sst2_smoke.yaml: field 'training.grad_sample_mode'.*tie_word_embeddings"):
        stages.resolve(str(smoke_job), str(project_root))
    assert not (workspace_env / "ledger.db").exists()
    edit_yaml(smoke_job, lambda d: d.update(training={"grad_sample_mode": "hooks"}))  # the same model with hooks is fine
    assert stages.resolve(str(smoke_job), str(project_root))["n_records"] == 2000


def test_validation_failure_stops_before_any_charge(workspace_env, smoke_job, project_root):
    edit_yaml(smoke_job.parent.parent / "datasets/sst2.yaml", lambda d: d.update(max_text_chars=5))
    ref = stages.resolve(str(smoke_job), str(project_root))
    with pytest.raises(DataValidationError, match="expect_column_value_lengths_to_be_between\\(text\\)"):
        stages.validate(str(smoke_job), ref)
    assert not (workspace_env / "ledger.db").exists()


def test_same_job_seed_still_draws_fresh_noise_each_run(workspace_env, smoke_job, project_root, tmp_path):
    """Two runs of one job must not share sampling or noise: shared noise cancels in differences."""
    from safetensors.torch import load_file

    edit_yaml(smoke_job, lambda d: d.update(train_max_records=64, dp={**d["dp"], "steps": 1, "expected_batch_size": 16}))
    weights = []
    for _ in range(2):
        ref = stages.resolve(str(smoke_job), str(project_root))
        plan = stages.plan(str(smoke_job), ref, policy_path=policy_accepting_inconclusive(tmp_path))  # 1 step tests nothing
        charge_id = stages.reserve(str(smoke_job), ref, plan)
        out = stages.train(str(smoke_job), ref, plan, charge_id)
        weights.append(load_file(f"{out['model_dir']}/trainable.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])


def test_second_attempt_on_a_started_charge_is_refused_before_reading(workspace_env, workspace_ledger, smoke_job, project_root):
    """What an automatic retry or a rescheduled training pod would do: refused, nothing read or trained."""
    from dpops.errors import LedgerError
    from dpops.ledger.states import RUNNING

    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref)
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    ledger = workspace_ledger()
    ledger.start(charge_id)  # the first attempt started reading, then its process died
    with pytest.raises(LedgerError, match="cannot go from 'running' to 'running'"):
        stages.train(str(smoke_job), ref, plan, charge_id)
    assert ledger.charge(charge_id).state == RUNNING  # still counted in full
    assert not (workspace_env / "runs").exists()
