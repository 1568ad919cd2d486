"""One private fine-tune, every stage a task (see docs/architecture.md, "The flow of one private fine-tune").

Two flows live here:

* ``private-finetune``, the parent: every stage as a task, and the entrypoint of the scheduled
  deployments in ``prefect.yaml``.
* ``dp-train``, stage 5 as a flow of its own. The parent runs it in-process (the default), or, when
  given ``train_deployment`` (e.g. ``"dp-train/gpu"``), as a run of that deployment on a GPU work
  pool, and waits for it.

A run the ledger refuses (the dataset's budget cannot take it, at ``plan`` when fitting the noise to
the remaining budget or when no block of a partitioned dataset is fresh, or at ``reserve``) ends in a terminal ``Cancelled``
state named ``Refused`` whose message is the ledger's reason, with a ``dpops-refusal`` markdown
artifact: visibly not a crash, and never retried. Called in-process (``dpops run``), the flow then
raises the ledger's :class:`~dpops.errors.BudgetExceededError`, so the CLI exits 3 with the reason.

No flow here retries: ``train`` reads private data after its charge is marked running, so another
attempt would read the data again without a new charge.
"""

from typing import Any, Optional

from prefect import flow
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelled, State

from dpops.errors import BudgetExceededError
from flows.limits import dataset_slot
from tasks import data, evaluation, privacy, tracking, training


@flow(name="dp-train", retries=0, persist_result=True, result_serializer="json", log_prints=False)
def dp_train(job_path: str, ref: dict[str, Any], plan: dict[str, Any], charge_id: str) -> dict[str, Any]:
    """Stage 5 alone. Its result (paths, step count, per-step epsilon, seconds, weight fingerprint;
    never records, nor any statistic of a private batch such as its loss) is persisted as JSON so
    that a parent waiting on a deployment run can read it back."""
    return training.train(job_path, ref, plan, charge_id)


def _train(job_path: str, ref: dict[str, Any], plan: dict[str, Any], charge_id: str, deployment: Optional[str]) -> dict[str, Any]:
    """Run ``dp-train`` in-process (nothing persisted), or as a run of ``deployment`` and wait for it.

    The idempotency key ties the deployment run to the charge: one charge, at most one training run.
    A failed or crashed training run raises here; its charge stays charged (data may have been read).
    """
    params = dict(job_path=job_path, ref=ref, plan=plan, charge_id=charge_id)
    if not deployment:
        return dp_train.with_options(persist_result=False)(**params)
    run = run_deployment(deployment, parameters=params, idempotency_key=f"dp-train-{charge_id}", timeout=None)
    return run.state.result()


def _refused(exc: BudgetExceededError) -> State:
    """The terminal state of a run the ledger refused; the exception travels with it for in-process callers."""
    tracking.refusal_artifact(str(exc))
    return Cancelled(name="Refused", message=str(exc), data=exc)


@flow(name="private-finetune", retries=0, persist_result=False, log_prints=False)
def private_finetune(
    job_path: str, policy_path: str, repo: Optional[str] = None, train_deployment: Optional[str] = None
) -> dict[str, Any]:
    run_id = str(flow_run.id) if flow_run.id else None
    ref = data.resolve(job_path, repo)
    data.validate(job_path, ref)
    # Plan inside the slot too: a plan fitted to the remaining budget (dp.fit_to_budget) then sees
    # the spend of the run before it.
    with dataset_slot(ref["dataset"]):
        try:
            plan = privacy.plan(job_path, ref, policy_path)  # the gate's policy: refuses a claim the audit cannot test
            charge_id = privacy.reserve(job_path, ref, plan, run_id)
        except BudgetExceededError as exc:
            return _refused(exc)
        trained = _train(job_path, ref, plan, charge_id, train_deployment)
        budget = privacy.settle(charge_id, trained["steps_run"])
    metrics = evaluation.evaluate(job_path, ref, trained["model_dir"])
    audit = evaluation.audit(job_path, plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"],
                             trained=trained, charge_id=charge_id)
    rec = tracking.record(job_path, ref, plan, charge_id, trained, metrics, audit, run_id)
    decision = tracking.gate(policy_path, rec)
    summary = {
        "dataset": ref["dataset"], "data_version": ref["version"], "charge_id": charge_id,
        "epsilon_run": audit["accountant_epsilon"], "delta": plan["delta"], "steps": trained["steps_run"],
        "noise_multiplier": plan["noise_multiplier"], "sample_rate": plan["sample_rate"],
        "cumulative_epsilon": budget["spent"], "epsilon_cap": budget["epsilon_cap"],
        "accuracy": metrics.get("accuracy"), "majority_baseline": metrics.get("majority_baseline"),  # None for a language model
        "eval_loss": metrics["eval_loss"], "perplexity": metrics.get("perplexity"),
        "audit_passed": audit["passed"], "audit_verdict": audit["verdict"],
        "audit_decided_by": audit["decided_by"], "audit_ceiling": audit["ceiling"],
        "canary_epsilon_lower_bound": audit["canary_epsilon_lower_bound"], "canary_ceiling": audit["canary_ceiling"],
        "white_box_epsilon_lower_bound": audit["white_box_epsilon_lower_bound"], "white_box_ceiling": audit["white_box_ceiling"],
        "noise_multiplier_upper": audit["noise_multiplier_upper"], "audit_pooled": rec.get("pooled"),
        "mia_auc": audit["mia_auc"], "mia_epsilon_lower_bound": audit["mia_epsilon_lower_bound"],
        "decision": decision["decision"], "reasons": decision["reasons"], "alias": decision["alias"],
        "gate_evidence": decision.get("evidence", []),
        "model": f"{rec['model_name']} v{rec['model_version']}", "mlflow_run_id": rec["run_id"],
        "train_seconds": trained["seconds"],
    }
    if plan.get("blocks"):  # a partitioned dataset: the blocks read, with their figures
        summary["blocks"] = budget["blocks_read"]
    tracking.summary_artifact(summary)
    return summary
