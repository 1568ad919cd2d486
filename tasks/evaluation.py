from typing import Any, Optional

from prefect import task
from prefect.artifacts import create_markdown_artifact

from dpops.assess import audit_report
from dpops.pipeline import stages
from tasks import TASK_OPTIONS


@task(name="evaluate", **TASK_OPTIONS)
def evaluate(job_path: str, ref: dict[str, Any], model_dir: str) -> dict[str, float]:
    return stages.evaluate(job_path, ref, model_dir)


@task(name="audit", **TASK_OPTIONS)
def audit(
    job_path: str, plan: dict[str, Any], model_dir: str, steps_run: int, canaries_path: str, *,
    trained: Optional[dict[str, Any]] = None, charge_id: Optional[str] = None,
) -> dict[str, Any]:
    out = stages.audit(job_path, plan, model_dir, steps_run, canaries_path, trained=trained, charge_id=charge_id)
    create_markdown_artifact(key="dpops-audit", markdown=audit_report.markdown(out), description="dpops privacy audit")
    return out
