from typing import Any, Optional

from prefect import task

from dpops.pipeline import stages
from tasks import TASK_OPTIONS


@task(name="resolve", **TASK_OPTIONS)
def resolve(job_path: str, repo: Optional[str] = None) -> dict[str, Any]:
    return stages.resolve(job_path, repo)


@task(name="validate", **TASK_OPTIONS)
def validate(job_path: str, ref: dict[str, Any]) -> dict[str, Any]:
    return stages.validate(job_path, ref)
