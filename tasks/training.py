from typing import Any

from prefect import task

from dpops.pipeline import stages
from tasks import TASK_OPTIONS


@task(name="train", **TASK_OPTIONS)
def train(job_path: str, ref: dict[str, Any], plan: dict[str, Any], charge_id: str) -> dict[str, Any]:
    return stages.train(job_path, ref, plan, charge_id)
