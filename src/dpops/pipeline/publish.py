"""Stages 9 and 10, and the reports: the MLflow record, the gate's decision, promotion, the budget.

What the gate reads comes from the ledger (the charge's binding and evidence), never from MLflow
tags; :mod:`dpops.pipeline.stages` holds the stages before.
"""

from __future__ import annotations

import traceback
from dataclasses import asdict
from typing import Any, Optional

from dpops.config.loading import load_policy
from dpops.config.workspace import workspace
from dpops.errors import ChargeNotFoundError
from dpops.ledger.store import Ledger
from dpops.pipeline import report, stages
from dpops.registry import gate, tracking

#: Audit figures appended to the charge's chain for the gate (figures only, never records).
#: Each bound is valid for one run of one model; the membership-inference heuristics are not recorded.
AUDIT_EVIDENCE = ("verdict", "reasons", "decided_by", "claimed_epsilon", "ceiling", "canary_epsilon_lower_bound", "canary_ceiling",
                  "white_box_epsilon_lower_bound", "white_box_ceiling", "noise_multiplier_upper", "cross_check_ok",
                  "outcomes", "mechanism")


def record(
    job_path: str, ref: dict[str, Any], p: dict[str, Any], charge_id: str, train_out: dict[str, Any],
    metrics: dict[str, float], audit_out: dict[str, Any], *, flow_run_id: Optional[str] = None,
) -> dict[str, Any]:
    """Stage 9: MLflow run + model version; the ledger binds the version to the charge and records the gate's evidence."""
    job, _ = stages._load(job_path)
    ws = workspace()
    ledger = stages._ledger(ws)
    try:
        charge = ledger.charge(charge_id)
        b = ledger.budget(charge.dataset, estimate=True)
        budget = {**stages._budget_view(b, read=list(charge.blocks)), "pld_estimate": b.pld_estimate}
        pooled = gate.pooled_evidence(ledger, charge.dataset, audit_out, pending=True)
        if pooled:  # this run's evidence with the dataset's earlier runs of the same mechanism (reported only)
            audit_out = {**audit_out, "pooled_runs": pooled["runs"], "pooled_canaries": pooled["canaries"],
                         "pooled_epsilon_lower_bound": pooled["epsilon_lower_bound"],
                         **{f"pooled_{k}": pooled[k] for k in ("bayes_epsilon_lo", "bayes_epsilon_hi") if pooled[k] is not None}}
        plan_out = {**p, "epsilon_spent": audit_out["accountant_epsilon"], "steps_run": train_out["steps_run"]}
        train_view = {k: train_out[k] for k in ("epsilon_by_step", "steps_run", "seconds", "grad_sample_mode", "trainable_parameters")}
        data_view = {k: ref[k] for k in ("dataset", "rev", "path", "fingerprint", "n_records", "version")}
        if ref.get("blocks"):
            data_view["blocks"] = dict(ref["blocks"])  # block names and their counts
        res = tracking.record(
            ws, job=job.model_dump(), plan=plan_out, data=data_view, charge_id=charge_id, train=train_view,
            metrics=metrics, audit=audit_out, dataset_budget=budget, model_dir=train_out["model_dir"], repo=ref["repo"],
            flow_run_id=flow_run_id,
        )
        # The gate and serving read the model binding and the evidence from here (hash-chained, each
        # written once), not from MLflow: the version, its run, the hash of its weights (the DP
        # output as logged), the task, the utility figures and the audit verdict.
        ledger.bind_model(charge_id, model_name=res.model_name, model_version=res.model_version, mlflow_run_id=res.run_id,
                          artifact_sha256=tracking.weights_sha256(train_out["model_dir"]))
        head = ledger.record_evidence(charge_id, task=job.task,
                                      figures={k: float(metrics[k]) for k in gate.UTILITY_FIGURES if k in metrics},
                                      audit={k: audit_out[k] for k in AUDIT_EVIDENCE})
        # A second copy of the chain head, outside the ledger's database (besides the anchor log):
        # it covers the charge's commit, its binding and its evidence.
        tracking.tag_chain_head(ws, run_id=res.run_id, head=head.label)
        return {**asdict(res), "budget": budget, "pooled": pooled}
    finally:
        ledger.dispose()


def gate_decision(policy_path: str, rec: dict[str, Any]) -> dict[str, Any]:
    """Stage 10: the flow's last step; the same check as ``dpops promote`` on the new version."""
    return promote(policy_path, rec["model_name"], rec["model_version"])


def promote(policy_path: str, model_name: str, version: str, *, alias: Optional[str] = None) -> dict[str, Any]:
    """Check the policy against the ledger for one model version; promote or refuse; record it.

    The version's charge is found through its ``dpops.charge_id`` tag, and every condition is
    then re-read from the ledger (see :mod:`dpops.registry.gate`). The decision is recorded both ways: a
    ``gate_decision`` ledger event and model version tags (plus the alias when promoted).
    """
    policy = load_policy(policy_path)
    alias = alias or policy.alias
    ws = workspace()
    model = f"{model_name}/{version}"
    charge_id = tracking.version_charge_id(ws, model_name, version)
    ledger = stages._ledger(ws)
    try:
        dataset, missing = _charge_dataset(ledger, charge_id, model)
        decision = gate.Decision(False, [missing]) if missing else gate.decide(ledger, charge_id=charge_id, policy=policy, model=model)
        tracking.apply_decision(ws, model_name=model_name, version=version, promote=decision.promote,
                                reasons=decision.reasons, alias=alias, evidence=decision.evidence)
        if dataset:
            head = ledger.record_decision(dataset, decision={
                "charge_id": charge_id, "model": model, "decision": decision.label, "reasons": decision.reasons,
                "alias": alias if decision.promote else None, "evidence": decision.evidence,
            })
            tracking.tag_gate_chain_head(ws, model_name=model_name, version=version, head=head.label)
        return {"promote": decision.promote, "decision": decision.label, "reasons": decision.reasons, "alias": alias,
                "model": model, "charge_id": charge_id, "evidence": decision.evidence}
    finally:
        ledger.dispose()


def budget_report() -> dict[str, Any]:
    """Every dataset's budget from the ledger: the figures, and the table `dpops budget` prints."""
    ledger = stages._ledger()
    try:
        budgets = ledger.budgets(estimate=True)
        return {"datasets": [report.budget_dict(b) for b in budgets], "table": report.budget_table(budgets)}
    finally:
        ledger.dispose()


def _charge_dataset(ledger: Ledger, charge_id: Optional[str], model: str) -> tuple[Optional[str], Optional[str]]:
    """(dataset of the charge, None) or (None, why there is no charge to check)."""
    if not charge_id:
        return None, f"model {model} has no 'dpops.charge_id' tag: no ledger charge to check"
    try:
        return ledger.charge(charge_id).dataset, None
    except ChargeNotFoundError as exc:  # the tag names no charge; any other ledger fault propagates
        return None, f"model {model}: {exc}"


def describe_failure(exc: BaseException) -> str:
    """One line for a failed stage, without the traceback's local values."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
