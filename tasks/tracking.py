from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact

from dpops.pipeline import publish, report
from tasks import TASK_OPTIONS


@task(name="record", **TASK_OPTIONS)
def record(
    job_path: str, ref: dict[str, Any], plan: dict[str, Any], charge_id: str, train: dict[str, Any],
    metrics: dict[str, float], audit: dict[str, Any], flow_run_id: Optional[str] = None,
) -> dict[str, Any]:
    return publish.record(job_path, ref, plan, charge_id, train, metrics, audit, flow_run_id=flow_run_id)


@task(name="gate", **TASK_OPTIONS)
def gate(policy_path: str, rec: dict[str, Any]) -> dict[str, Any]:
    return publish.gate_decision(policy_path, rec)


@task(name="summary-artifact", **TASK_OPTIONS)
def summary_artifact(summary: dict[str, Any]) -> None:
    create_markdown_artifact(key="dpops-summary", markdown=report.markdown(summary), description="dpops run summary")


@task(name="refusal-artifact", **TASK_OPTIONS)
def refusal_artifact(reason: str) -> None:
    """The ledger's reason for refusing a run (figures only), shown beside the run's ``Refused`` state."""
    create_markdown_artifact(key="dpops-refusal", markdown=f"# dpops: run refused by the ledger\n\n{reason}\n",
                             description="why the privacy ledger refused this run")


@task(name="budgets", **TASK_OPTIONS)
def budgets() -> dict[str, Any]:
    return publish.budget_report()


@task(name="budget-artifact", **TASK_OPTIONS)
def budget_artifact(budgets: dict[str, Any]) -> None:
    create_markdown_artifact(key="dpops-budget", markdown=f"# dpops budgets\n\n```\n{budgets['table']}\n```\n",
                             description="every dataset's cap, spent and remaining epsilon, from the ledger")
