"""The whole flow on a tiny subset: real Prefect (test harness), MLflow (SQLite in tmp), DVC,
Great Expectations and Opacus. Nothing mocked."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from dpops.config import loading as config
from dpops.errors import BudgetExceededError
from dpops.ledger.states import COMMITTED
from dpops.ledger.store import Ledger
from dpops.pipeline import planning as privacy
from dpops.privacy import filters
from tests.helpers import edit_yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def configs(configs_dir, project_root):
    if not (project_root / "data/prepared/sst2/train.tsv").exists():
        pytest.fail("data/prepared/sst2 is missing: run `make data` (dvc pull + dvc repro) first")
    return configs_dir


def _run(configs, project_root):
    from flows.private_finetune import private_finetune

    return private_finetune(
        job_path=str(configs / "jobs/sst2_smoke.yaml"), policy_path=str(configs / "policy.yaml"), repo=str(project_root)
    )


def _one_run_filter_epsilon(configs, n=2000 + 100 + 2000):  # records + canaries + gradient canaries
    job = config.load_job_config(configs / "jobs/sst2_smoke.yaml")
    ds = config.dataset_config_for(job, configs / "jobs/sst2_smoke.yaml")
    p = privacy.plan(dataset=ds, dp=job.dp, n_records=n)
    return p, ds


def test_flow_end_to_end_records_ledger_mlflow_and_promotes(prefect_harness, workspace_env, configs, project_root):
    edit_yaml(configs / "policy.yaml", lambda d: d.update(min_accuracy=0.0))
    summary = _run(configs, project_root)

    plan, ds = _one_run_filter_epsilon(configs)
    ledger = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    charge = ledger.charge(summary["charge_id"])
    assert charge.state == COMMITTED and charge.steps_run == plan.steps == 5
    assert charge.mechanism.sample_rate == plan.sample_rate and charge.n_records == 2000 + 100 + 2000
    assert charge.data_version.startswith("hmac-sha256:") and charge.flow_run_id
    assert ledger.filter_of("sst2") == plan.filter  # fixed at registration, from the job's mechanism
    assert ledger.budget("sst2").spent == pytest.approx(plan.filter.epsilon([plan.mechanism], delta=ds.privacy.delta))
    assert ledger.verify() == []
    kinds = [e["event"] for e in ledger.history("sst2")]
    assert kinds == ["registered", "reserved", "running", "progress", "finished", "committed", "model_bound", "evidence", "gate_decision"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace_env / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["dpops.charge_id"] == charge.id
    assert run.data.metrics["epsilon_run"] == pytest.approx(summary["epsilon_run"])
    assert run.data.metrics["dataset_sst2_cumulative_epsilon"] == pytest.approx(ledger.budget("sst2").spent)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epsilon")] == [5]
    version = client.get_model_version_by_alias("sst2-sentiment-smoke", "production")
    assert version.tags["dpops.charge_id"] == charge.id and version.tags["dpops.gate"] == "PROMOTED"
    assert float(version.tags["dpops.epsilon"]) == pytest.approx(summary["epsilon_run"], rel=1e-5)

    mlflow.set_tracking_uri(f"sqlite:///{workspace_env / 'mlflow.db'}")
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/sst2-sentiment-smoke@production")
    pred = model.predict(pd.DataFrame({"text": ["a wonderful film", "a dull mess"]}))
    assert set(pred["label"]) <= {"0", "1"} and len(pred) == 2

    _assert_no_plain_hash_of_the_training_file(project_root, ledger, client, run, version, charge)


def _assert_no_plain_hash_of_the_training_file(project_root, ledger, client, run, version, charge):
    """No MLflow param, tag or report, ledger field or Prefect parameter, artifact or log holds the
    sha256 or an md5 (DVC's, from dvc.lock) of the private training file: only the keyed fingerprint."""
    content = (project_root / "data/prepared/sst2/train.tsv").read_bytes()
    lock = yaml.safe_load((project_root / "dvc.lock").read_text())
    dvc_md5s = {o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])
                if o["path"].endswith("sst2/train.tsv")}
    plain = {hashlib.sha256(content).hexdigest(), hashlib.md5(content).hexdigest(), *dvc_md5s}
    assert len(plain) >= 3

    assert run.data.params["data.fingerprint"] == charge.data_version.removeprefix("hmac-sha256:")
    report = Path(client.download_artifacts(run.info.run_id, "privacy_report.json")).read_text()
    released = {
        "mlflow params": json.dumps(run.data.params), "mlflow tags": json.dumps(run.data.tags),
        "model version tags": json.dumps(version.tags), "privacy_report.json": report,
        "ledger charge": json.dumps(asdict(charge), default=str), "ledger history": json.dumps(list(ledger.history("sst2")), default=str),
    }
    from prefect import get_client

    with get_client(sync_client=True) as prefect:
        released["prefect flow run parameters"] = json.dumps([r.parameters for r in prefect.read_flow_runs()], default=str)
        released["prefect artifacts"] = json.dumps([a.data for a in prefect.read_artifacts()], default=str)
        released["prefect logs"] = "\n".join(log.message for log in prefect.read_logs())
    assert '"ref": {' in released["prefect flow run parameters"], "dp-train's parameters (ref) are stored and checked"
    leaks = [(where, h) for where, text in released.items() for h in plain if h in text]
    assert not leaks, leaks


def test_next_run_over_cap_is_refused_before_training(prefect_harness, workspace_env, configs, project_root):
    plan, ds = _one_run_filter_epsilon(configs)
    f = plan.filter  # named in the config: the filter then does not move with the cap set below
    one, two = (f.epsilon([plan.mechanism] * k, delta=ds.privacy.delta) for k in (1, 2))
    edit_yaml(configs / "datasets/sst2.yaml",
              lambda d: d["privacy"].update(epsilon_cap=(one + two) / 2, filter_orders=list(f.orders)))

    first = _run(configs, project_root)
    assert first["decision"] == "REFUSED"  # the policy's 0.70 accuracy is out of reach in 5 steps
    with pytest.raises(BudgetExceededError, match=r"'sst2'.*spent.*requests.*cap"):
        _run(configs, project_root)

    ledger = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    assert ledger.budget("sst2").charges == {"committed": 1}
    assert len(list((workspace_env / "runs").iterdir())) == 1  # nothing trained for the refused run
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace_env / 'mlflow.db'}")
    assert [str(v.version) for v in client.search_model_versions("name='sst2-sentiment-smoke'")] == ["1"]


def test_refused_run_ends_cancelled_named_refused_with_reason(prefect_harness, workspace_env, configs, project_root):
    """Over budget from the first run: a clean terminal state with the ledger's reason, nothing charged or trained."""
    plan, ds = _one_run_filter_epsilon(configs)
    one = filters.filter_epsilon([plan.mechanism], delta=ds.privacy.delta)
    edit_yaml(configs / "datasets/sst2.yaml", lambda d: d["privacy"].update(epsilon_cap=one / 2))
    from prefect import get_client

    from flows.budget_report import budget_report
    from flows.private_finetune import private_finetune

    state = private_finetune(
        job_path=str(configs / "jobs/sst2_smoke.yaml"), policy_path=str(configs / "policy.yaml"), repo=str(project_root),
        return_state=True,
    )
    assert state.is_cancelled() and state.name == "Refused"
    assert "'sst2': refused" in state.message and "Nothing was trained" in state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        [refusal] = [a for a in artifacts if a.flow_run_id == state.state_details.flow_run_id and a.key == "dpops-refusal"]
        assert state.message in refusal.data
        limit = client.read_global_concurrency_limit_by_name("dpops-dataset-sst2")
        assert limit.limit == 1 and limit.active_slots == 0  # released on refusal

    ledger = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    assert ledger.budget("sst2").charges == {}
    assert not (workspace_env / "runs").exists()

    report = budget_report()
    assert [d["name"] for d in report["datasets"]] == ["sst2"] and report["datasets"][0]["charges"] == {}
    assert report["datasets"][0]["spent"] == pytest.approx(ledger.budget("sst2").spent)
    assert "sst2" in report["table"]


def test_a_claim_the_canaries_cannot_test_is_refused_at_plan_unless_the_policy_accepts_it(
    prefect_harness, workspace_env, configs, project_root
):
    """The flow hands its policy to plan: with 10 canaries the smoke job's epsilon 1 is untestable,
    so the project policy refuses it before anything is charged; a policy that accepts
    INCONCLUSIVE runs it, and the gate then promotes on that verdict."""
    from dpops.errors import ConfigError

    edit_yaml(configs / "jobs/sst2_smoke.yaml", lambda d: d["audit"].update(canaries=10, gradient_canaries=0))
    with pytest.raises(ConfigError, match=r"field 'audit\.gradient_canaries' \(0\)\) can refute at most.*Nothing was charged"):
        _run(configs, project_root)
    assert not (workspace_env / "ledger.db").exists() and not (workspace_env / "runs").exists()

    edit_yaml(configs / "policy.yaml", lambda d: d.update(min_accuracy=0.0, accept_inconclusive=True))
    summary = _run(configs, project_root)
    assert summary["audit_verdict"] == "INCONCLUSIVE" and summary["decision"] == "PROMOTED", summary["reasons"]


def test_recurring_runs_pool_their_audit_evidence_in_the_ledger(prefect_harness, workspace_env, configs, project_root):
    """Each run keeps its canary outcomes in its evidence event; the second run of the same
    mechanism reports the pooled evidence of both (in the summary, MLflow and the gate's
    statement), and the gate still decides on the run's own one-run bounds."""
    import mlflow

    from dpops.assess import pooling

    edit_yaml(configs / "policy.yaml", lambda d: d.update(min_accuracy=0.0))
    first = _run(configs, project_root)
    second = _run(configs, project_root)
    assert first["audit_pooled"]["runs"] == 1 and second["audit_pooled"]["runs"] == 2
    assert second["audit_pooled"]["canaries"] == 2 * 2000 and second["audit_pooled"]["kind"] == "white_box"
    ledger = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    payloads = [p for _, p in ledger.evidence_of("sst2")]
    assert [set(p["audit"]["outcomes"]) for p in payloads] == [{"white_box", "black_box"}] * 2
    again = pooling.dataset_pool(payloads, mechanism=payloads[-1]["audit"]["mechanism"],
                                 confidence=pooling.sequential_confidence(2))
    assert again.epsilon_lower_bound == pytest.approx(second["audit_pooled"]["epsilon_lower_bound"])
    assert any(line.startswith("pooled over 2 run(s)") for line in second["gate_evidence"])
    # The gate decides on the run's own verdict. A correct run's audit FAILs with probability at most
    # its false-alarm rate (5%, by design), so the verdict itself is not asserted here.
    assert second["audit_verdict"] in ("PASS", "FAIL")
    assert second["decision"] == ("PROMOTED" if second["audit_verdict"] == "PASS" else "REFUSED")
    client = mlflow.tracking.MlflowClient(f"sqlite:///{workspace_env / 'mlflow.db'}")
    metrics = client.get_run(second["mlflow_run_id"]).data.metrics
    assert metrics["audit_pooled_runs"] == 2 and "audit_white_box_epsilon_lower_bound" in metrics
    name, version = second["model"].split(" v")
    tag = json.loads(client.get_model_version(name, version).tags["dpops.gate_evidence"])
    assert tag == second["gate_evidence"] and tag[0].startswith(f"audit {second['audit_verdict']} (decided by the ")
    [decision] = [e for e in ledger.history("sst2") if e["event"] == "gate_decision" and e["charge"] == second["charge_id"]]
    assert decision["payload"]["evidence"] == tag
