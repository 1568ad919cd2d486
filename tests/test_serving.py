"""Deployment only through the gate: an alias set in MLflow is not enough to be served (issue 16).

The model versions here are real MLflow registry entries whose artifacts hold an MLmodel with the
``weights`` artifact dpops models have and a weight file; the ledger is the real one. `dpops
predict` and `dpops serve` refuse before loading anything; `serving.check` says what they would serve.
"""

import hashlib

import mlflow
import yaml
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.config.workspace import workspace
from dpops.ledger.store import Ledger
from dpops.privacy.accounting import SubsampledGaussian
from dpops.registry import serving
from tests.test_gate import GOOD_AUDIT

runner = CliRunner()


def _version(client, tmp_path, name: str, weights: bytes) -> tuple[str, str, str]:
    """A registered version of ``name`` from a run whose artifacts hold the weights; (version, run id, source dir)."""
    src = tmp_path / f"src-{len(list(tmp_path.glob('src-*')))}"
    (src / "artifacts/model").mkdir(parents=True)
    (src / "artifacts/model/trainable.safetensors").write_bytes(weights)
    (src / "MLmodel").write_text(yaml.safe_dump({"flavors": {"python_function": {
        "loader_module": "mlflow.pyfunc.model", "artifacts": {"weights": {"path": "artifacts/model", "uri": "model"}}}}}))
    exp = client.get_experiment_by_name("serving") or client.get_experiment(client.create_experiment("serving"))
    run = client.create_run(exp.experiment_id)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    mv = client.create_model_version(name, source=src.as_uri(), run_id=run.info.run_id)
    return str(mv.version), run.info.run_id, str(src)


def _recorded_charge(ledger: Ledger, name: str, version: str, run_id: str, weights: bytes) -> str:
    ledger.register_dataset(name="notes", unit="record", delta=1e-6, epsilon_cap=8.0)
    c = ledger.reserve(dataset="notes", mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                       n_records=50_000, job="j", data_version=f"v-{version}")
    ledger.start(c.id)
    ledger.commit(c.id, steps_run=100)
    ledger.bind_model(c.id, model_name=name, model_version=version, mlflow_run_id=run_id,
                      artifact_sha256=hashlib.sha256(weights).hexdigest())
    ledger.record_evidence(c.id, task="classification", figures={"accuracy": 0.9}, audit=GOOD_AUDIT)
    return c.id


def test_only_a_version_the_gate_promoted_under_that_alias_is_served(workspace_env, tmp_path, project_root):
    workspace_env.mkdir(parents=True)
    ws = workspace()
    client = mlflow.MlflowClient(tracking_uri=ws.tracking_uri)
    ledger = Ledger(ws.ledger_url)
    weights = b"dp weights"
    version, run_id, src = _version(client, tmp_path, "m", weights)
    charge = _recorded_charge(ledger, "m", version, run_id, weights)
    client.set_model_version_tag("m", version, "dpops.charge_id", charge)

    # "Promote model" clicked in the MLflow UI: the alias exists, the gate never said yes
    client.set_registered_model_alias("m", "production", version)
    for args in (["predict", "--model", "m", "a text"], ["serve", "m"]):
        out = runner.invoke(app, args)
        assert out.exit_code == 1, out.output
        assert "no PROMOTED gate decision for model m/" in out.output and "alias 'production'" in out.output

    # the gate promotes it: the checked copy is what would be served
    policy = str(project_root / "configs/policy.yaml")
    assert runner.invoke(app, ["promote", "m", version, "--policy", policy]).exit_code == 0
    checked = serving.check(ws, "m", "production", tmp_path / "dl-1")
    assert checked.reasons == [] and checked.version == version

    # a version never recorded by a run, pointed at by the alias directly: refused
    other, _, _ = _version(client, tmp_path, "m", b"unaccounted")
    client.set_registered_model_alias("m", "production", other)
    assert any("bound to no ledger charge" in r for r in serving.check(ws, "m", "production", tmp_path / "dl-2").reasons)

    # the promoted version's weights replaced in the artifact store after promotion: refused
    client.set_registered_model_alias("m", "production", version)
    (tmp_path / src.split("/")[-1] / "artifacts/model/trainable.safetensors").write_bytes(b"other weights")
    reasons = serving.check(ws, "m", "production", tmp_path / "dl-3").reasons
    assert any("the artifact was replaced" in r for r in reasons), reasons
