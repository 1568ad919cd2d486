"""MLflow record (stage 9): params, epsilon per step, metrics, privacy report, model version.

MLflow shows the figures; the ledger decides. Nothing logged here contains a record: only
counts, keyed data fingerprints (never a plain hash of a private file), configs and metrics. No training-loss curve is logged: the loss of a private
Poisson batch is a raw statistic of private records, and a DP estimate of it would be a mechanism
of its own that the ledger would have to charge. The run's tag ``dpops.train_loss_curve`` says so
(:data:`TRAIN_LOSS_CURVE`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import dpops
from dpops.config.workspace import Workspace

_log = logging.getLogger("dpops.tracking")


@dataclass(frozen=True)
class RecordResult:
    run_id: str
    experiment_id: str
    model_name: str
    model_version: str


def git_commit(path: str | Path) -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(path), capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _client(ws: Workspace):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(ws.tracking_uri)
    return mlflow, mlflow.MlflowClient(tracking_uri=ws.tracking_uri)


def _experiment(mlflow: Any, client: Any, name: str, ws: Workspace) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if ws.tracking_uri.startswith("sqlite"):
        ws.artifacts.mkdir(parents=True, exist_ok=True)
        location = (ws.artifacts / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


#: Value of the run tag ``dpops.train_loss_curve``: no training loss is shown, neither raw nor DP.
TRAIN_LOSS_CURVE = "not released (the loss of private batches is not DP; no DP estimate is charged)"

#: Longest list of block names logged as one param or tag (MLflow limits their length); a longer
#: list is logged as a count, and the names stay in ``privacy_report.json``.
MAX_BLOCKS_LABEL = 500


def _blocks_label(names: list[str]) -> str:
    label = ",".join(names)
    return label if len(label) <= MAX_BLOCKS_LABEL else f"{len(names)} blocks (see privacy_report.json)"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ",".join(str(v) for v in value)
    else:
        out[prefix] = value


def record(
    ws: Workspace,
    *,
    job: dict[str, Any],
    plan: dict[str, Any],
    data: dict[str, Any],
    charge_id: str,
    train: dict[str, Any],
    metrics: dict[str, float],
    audit: dict[str, Any],
    dataset_budget: dict[str, Any],
    model_dir: str,
    repo: str,
    flow_run_id: Optional[str] = None,
) -> RecordResult:
    """Log one private fine-tune to MLflow and register its model version with privacy tags."""
    mlflow, client = _client(ws)
    from dpops.registry.pyfunc import PyfuncClassifier

    experiment_id = _experiment(mlflow, client, job["name"], ws)
    name = job["registered_model"]
    dataset = data["dataset"]
    tags = {
        "dpops.version": dpops.__version__,
        "dpops.git_commit": git_commit(repo) or "unknown",
        "dpops.dataset": dataset,
        "dpops.data_version": data["version"],
        "dpops.data_rev": str(data.get("rev")),
        "dpops.charge_id": charge_id,
        "dpops.flow_run_id": str(flow_run_id),
        "dpops.epsilon": f"{plan['epsilon_spent']:.6f}",
        "dpops.delta": f"{plan['delta']:g}",
        "dpops.accountant": "rdp",
        "dpops.sampler": plan["sampler"],
        "dpops.cumulative_epsilon": f"{dataset_budget['spent']:.6f}",
        "dpops.epsilon_cap": f"{dataset_budget['epsilon_cap']:g}",
        "dpops.privacy_filter": dataset_budget.get("filter", "unknown"),  # fixed at the dataset's registration
        "dpops.runs_left": str(dataset_budget.get("runs_left")),  # more runs of this mechanism the filter admits
        "dpops.train_loss_curve": TRAIN_LOSS_CURVE,
    }
    blocks_read = list(plan.get("blocks") or [])
    if blocks_read:  # a partitioned dataset: which blocks this run read (names only)
        tags["dpops.blocks"] = _blocks_label(blocks_read)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{job['name']}-{charge_id[:8]}", tags=tags) as run:
        params: dict[str, Any] = {}
        _flatten("job", job, params)
        _flatten("plan", {k: plan[k] for k in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "n_records", "expected_batch_size", "target_epsilon")}, params)
        params["data.fingerprint"] = data["fingerprint"]  # HMAC-SHA256 under the workspace key
        params["data.n_records"] = data["n_records"]
        params["train.grad_sample_mode"] = train["grad_sample_mode"]
        params["train.trainable_parameters"] = train["trainable_parameters"]
        if blocks_read:
            params["plan.blocks"] = _blocks_label(blocks_read)
            params["plan.n_blocks"] = len(blocks_read)
        mlflow.log_params({k: ("None" if v is None else v) for k, v in params.items()})
        for step, eps in train["epsilon_by_step"]:
            mlflow.log_metric("epsilon", eps, step=step)
        mlflow.log_metrics({
            "epsilon_run": plan["epsilon_spent"],
            "steps_run": train["steps_run"],
            "train_seconds": train["seconds"],
            **metrics,
            **{f"audit_{k}": float(v) for k, v in audit.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "audit_passed": float(audit["passed"]),  # 1 only for verdict PASS
            f"dataset_{dataset}_cumulative_epsilon": dataset_budget["spent"],
            f"dataset_{dataset}_remaining_epsilon": dataset_budget["remaining"],
            f"dataset_{dataset}_epsilon_cap": dataset_budget["epsilon_cap"],
            # a tighter figure for the same charges as a fixed sequence: reported, never enforced
            f"dataset_{dataset}_cumulative_epsilon_pld_estimate": dataset_budget.get("pld_estimate") or 0.0,
        })
        # Every block's figures after this run (names and figures only; a block's records never).
        block_metrics: dict[str, float] = {}
        for b in dataset_budget.get("blocks") or []:
            prefix = f"dataset_{dataset}_block_{b['name']}"
            block_metrics.update({f"{prefix}_cumulative_epsilon": b["spent"], f"{prefix}_remaining_epsilon": b["remaining"],
                                  f"{prefix}_read": float(b["name"] in blocks_read)})
        if block_metrics:
            mlflow.log_metrics(block_metrics)
        report = {
            "dataset": dataset, "data": data, "charge_id": charge_id, "plan": plan,
            "dataset_budget": dataset_budget, "audit": audit, "metrics": metrics,
            "note": "cumulative epsilon is the ledger's adaptive-composition guarantee (RDP filter); "
                    "the run epsilon is the RDP accountant for this run alone",
        }
        mlflow.log_dict(report, "privacy_report.json")
        mlflow.log_artifacts(audit["report_dir"], "audit")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=PyfuncClassifier(),
            artifacts={"weights": model_dir},
            registered_model_name=name,
            pip_requirements=[f"dpops=={dpops.__version__}"],
        )
        run_id = run.info.run_id
    version = str(info.registered_model_version)
    for key, value in {**tags, "dpops.audit": audit["verdict"],
                       "dpops.audit_epsilon_lower_bound": f"{audit['canary_epsilon_lower_bound']:.3f}",
                       "dpops.audit_decided_by": str(audit.get("decided_by", "")),
                       "dpops.audit_ceiling": f"{audit.get('ceiling', audit['canary_ceiling']):.3f}",
                       "dpops.audit_white_box_epsilon_lower_bound": f"{audit.get('white_box_epsilon_lower_bound', 0.0):.3f}",
                       "dpops.accuracy": f"{metrics.get('accuracy', float('nan')):.4f}"}.items():
        client.set_model_version_tag(name, version, key, value)
    return RecordResult(run_id=run_id, experiment_id=experiment_id, model_name=name, model_version=version)


#: The weight file of a dpops model (the DP output), as :func:`dpops.models.hf.save` writes it.
WEIGHTS_FILE = "trainable.safetensors"


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 of a saved model's weight file (the DP output; its hash is post-processing)."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS_FILE, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pyfunc_weights_dir(local_model: str | Path) -> Path:
    """The weights directory inside a downloaded pyfunc model: the path its MLmodel gives the
    ``weights`` artifact (what :class:`dpops.registry.pyfunc.PyfuncClassifier` loads)."""
    from mlflow.models import Model

    flavor = Model.load(str(local_model)).flavors.get("python_function", {})
    path = (flavor.get("artifacts") or {}).get("weights", {}).get("path")
    if not path:
        raise FileNotFoundError(f"{local_model}: the model has no 'weights' artifact (not a dpops model)")
    return Path(local_model) / path


def version_charge_id(ws: Workspace, model_name: str, version: str) -> Optional[str]:
    """The ledger charge a model version points to (its ``dpops.charge_id`` tag), if any.

    Raises:
        mlflow.exceptions.MlflowException: no such registered model version.
    """
    _, client = _client(ws)
    return client.get_model_version(model_name, str(version)).tags.get("dpops.charge_id")


def tag_chain_head(ws: Workspace, *, run_id: str, head: str) -> None:
    """Tag the run with ``dpops.chain_head``, the ledger's chain head after the record stage
    (``"<dataset>:<seq>:<hash>"``): a copy kept outside the ledger's database, like an anchor.

    Written after the ledger's events are committed: a failure here is logged, not raised (the
    evidence is written once; failing the stage now would leave a run that can never be recorded).
    """
    try:
        _, client = _client(ws)
        client.set_tag(run_id, "dpops.chain_head", head)
    except Exception as exc:  # MLflow raises many kinds; the ledger stays the record
        _log.warning("MLflow run %s: tag dpops.chain_head not written: %s", run_id, type(exc).__name__)


def tag_gate_chain_head(ws: Workspace, *, model_name: str, version: str, head: str) -> None:
    """Tag the model version with ``dpops.gate_chain_head``, the chain head after its gate decision
    (see :func:`tag_chain_head`; a failure is logged, not raised)."""
    try:
        _, client = _client(ws)
        client.set_model_version_tag(model_name, str(version), "dpops.gate_chain_head", head)
    except Exception as exc:
        _log.warning("model %s/%s: tag dpops.gate_chain_head not written: %s", model_name, version, type(exc).__name__)


def apply_decision(ws: Workspace, *, model_name: str, version: str, promote: bool, reasons: list[str], alias: str,
                   evidence: Optional[list[str]] = None) -> None:
    """Mirror a gate decision into MLflow: version tags (the decision, its reasons and the audit
    evidence the gate read), run tag, and the alias when promoted."""
    _, client = _client(ws)
    label = "PROMOTED" if promote else "REFUSED"
    client.set_model_version_tag(model_name, version, "dpops.gate", label)
    client.set_model_version_tag(model_name, version, "dpops.gate_reasons", json.dumps(reasons))
    if evidence:
        client.set_model_version_tag(model_name, version, "dpops.gate_evidence", json.dumps(evidence))
    run_id = client.get_model_version(model_name, str(version)).run_id
    if run_id:
        client.set_tag(run_id, "dpops.gate", label)
    if promote:
        client.set_registered_model_alias(model_name, alias, version)
