from typing import Any, Optional

from prefect import task

from dpops.pipeline import stages
from tasks import TASK_OPTIONS


@task(name="plan", **TASK_OPTIONS)
def plan(job_path: str, ref: dict[str, Any], policy_path: Optional[str] = None) -> dict[str, Any]:
    return stages.plan(job_path, ref, policy_path=policy_path)


@task(name="reserve", **TASK_OPTIONS)
def reserve(job_path: str, ref: dict[str, Any], plan: dict[str, Any], flow_run_id: Optional[str] = None) -> str:
    return stages.reserve(job_path, ref, plan, flow_run_id=flow_run_id)


@task(name="settle", **TASK_OPTIONS)
def settle(charge_id: str, steps_run: int) -> dict[str, Any]:
    return stages.settle(charge_id, steps_run)
