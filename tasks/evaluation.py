from typing import Any

from prefect import task

from dpops import stages
from tasks import TASK_OPTIONS


@task(name="evaluate", **TASK_OPTIONS)
def evaluate(job_path: str, ref: dict[str, Any], model_dir: str) -> dict[str, float]:
    return stages.evaluate(job_path, ref, model_dir)


@task(name="audit", **TASK_OPTIONS)
def audit(job_path: str, ref: dict[str, Any], plan: dict[str, Any], model_dir: str, steps_run: int) -> dict[str, Any]:
    return stages.audit(job_path, ref, plan, model_dir, steps_run)
