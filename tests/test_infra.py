"""The deployment files, checked without Docker or a cluster: prefect.yaml against the flows, the
compose stack's services and wiring, the runner image's pins, and the Kubernetes GPU job template
rendered by prefect-kubernetes' own job-configuration code."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"


# --------------------------------------------------------------------------- prefect.yaml


@pytest.fixture(scope="module")
def prefect_yaml():
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _entrypoint_flow(entrypoint: str):
    path, name = entrypoint.split(":")
    spec = importlib.util.spec_from_file_location(f"_entry_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def test_prefect_yaml_deployments_match_the_flows(prefect_yaml):
    import inspect

    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    flows = {name: _entrypoint_flow(d["entrypoint"]) for name, d in deployments.items()}
    full_names = {f"{flows[n].name}/{n}" for n in deployments}
    assert full_names == {"private-finetune/sst2-weekly", "dp-train/gpu", "budget-report/daily"}
    for name, d in deployments.items():
        flow = flows[name]
        assert flow.retries == 0, f"{name}: a flow that reads private data must not retry"
        assert set(d.get("parameters", {})) <= set(inspect.signature(flow.fn).parameters), name
        for key in ("job_path", "policy_path"):
            if key in d.get("parameters", {}):
                assert (ROOT / d["parameters"][key]).is_file(), f"{name}: {key} {d['parameters'][key]} does not exist"
        train = d.get("parameters", {}).get("train_deployment")
        assert train is None or train in full_names, f"{name}: train_deployment {train!r} is not deployed here"


def test_prefect_yaml_schedules_and_pools(prefect_yaml):
    from prefect.client.schemas.schedules import CronSchedule

    deployments = {d["name"]: d for d in prefect_yaml["deployments"]}
    crons = {n: [CronSchedule(cron=s["cron"], timezone=s["timezone"]) for s in d.get("schedules", [])] for n, d in deployments.items()}
    assert [c.cron for c in crons["sst2-weekly"]] == ["0 3 * * 1"] and [c.cron for c in crons["daily"]] == ["0 6 * * *"]
    assert crons["gpu"] == [], "training is started by its parent, never on its own schedule"
    assert deployments["gpu"]["work_pool"]["name"] == "dpops-gpu"
    assert deployments["sst2-weekly"]["work_pool"]["name"] == deployments["daily"]["work_pool"]["name"] == "dpops-cpu"
    assert deployments["sst2-weekly"]["concurrency_limit"]["limit"] == 1
    steps = [next(iter(s)) for s in prefect_yaml["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory"], "no git pull: run the deployed code"


# --------------------------------------------------------------------------- Kubernetes GPU pool


def _render_gpu_job(values: dict) -> dict:
    """The Job manifest a Kubernetes worker would submit for a flow run, built by prefect-kubernetes."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((INFRA / "k8s/gpu-base-job-template.json").read_text())
    # The template references no blocks or variables, so this client (to nowhere) is never called.
    offline = PrefectClient(api="http://127.0.0.1:9/api")
    cfg = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=offline))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="dp-train-run", flow_id=uuid.uuid4()))
    return cfg.job_manifest


def test_gpu_job_template_requests_gpus_on_gpu_nodes():
    job = _render_gpu_job({"env": {"DPOPS_LEDGER_URL": "postgresql+psycopg://db/dpops"}})
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert container["image"] == "dpops-gpu-runner:0.1.0" and container["args"] == ["prefect", "flow-run", "execute"]
    # Never retried behind the ledger's back: no Kubernetes retries, an evicted pod ends Crashed.
    assert job["spec"]["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"
    assert env["DPOPS_LEDGER_URL"] == "postgresql+psycopg://db/dpops"


def test_gpu_job_template_takes_the_pools_values():
    pod = _render_gpu_job({"gpu_count": 4, "node_selector": {"pool": "a100"}, "tolerations": [], "image": "reg/dpops:1"})["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"pool": "a100"} and pod["tolerations"] == [] and pod["containers"][0]["image"] == "reg/dpops:1"


# --------------------------------------------------------------------------- compose stack


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_has_the_stack_with_healthchecks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-buckets", "prefect", "mlflow", "ledger-migrate", "worker"}
    for name, svc in services.items():
        assert name in ("minio-buckets", "ledger-migrate") or "healthcheck" in svc, f"{name} has no healthcheck"
        image = svc.get("image", "")
        assert image and ":" in image and not image.endswith(":latest"), f"{name}: image {image!r} is not pinned"
    assert "prefect server start" in services["prefect"]["command"]
    assert "prefect worker start --pool dpops-cpu" in services["worker"]["command"]
    assert services["prefect"]["image"].startswith("prefecthq/prefect:3.8.")


def test_compose_wires_postgres_and_minio(compose):
    services = compose["services"]
    init = (INFRA / "postgres-init.sql").read_text()
    databases = set(re.findall(r"CREATE DATABASE (\w+)", init)) | {services["postgres"]["environment"]["POSTGRES_DB"]}
    prefect_db = services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = " ".join(services["mlflow"]["command"].split())
    worker_env = services["worker"]["environment"]
    assert prefect_db.startswith("postgresql+asyncpg://")
    assert "--backend-store-uri postgresql+psycopg://" in mlflow_cmd and "--artifacts-destination s3://mlflow" in mlflow_cmd
    assert worker_env["DPOPS_LEDGER_URL"].startswith("postgresql+psycopg://")
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and worker_env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    for url in (prefect_db, mlflow_cmd.split("--backend-store-uri ")[1].split()[0], worker_env["DPOPS_LEDGER_URL"]):
        assert url.rsplit("/", 1)[1] in databases, f"{url}: database not created"
    assert "local/mlflow" in services["minio-buckets"]["entrypoint"] and "local/dvc" in services["minio-buckets"]["entrypoint"]


def test_compose_runs_the_pipeline_as_a_role_that_owns_nothing(compose):
    """Fails on the old stack (the worker connected as the superuser that owns the ledger)."""
    services = compose["services"]
    owner = services["postgres"]["environment"]["POSTGRES_USER"]
    pipeline_url = services["worker"]["environment"]["DPOPS_LEDGER_URL"]
    pipeline_role = pipeline_url.split("://", 1)[1].split(":", 1)[0]
    assert pipeline_role != owner
    migrate = services["ledger-migrate"]
    assert migrate["command"].split() == ["dpops", "ledger", "upgrade", "--grant", pipeline_role]
    admin_url = migrate["environment"]["DPOPS_LEDGER_ADMIN_URL"]
    assert admin_url.split("://", 1)[1].split(":", 1)[0] == owner
    assert admin_url.rsplit("/", 1)[1] == pipeline_url.rsplit("/", 1)[1]  # the same ledger database
    assert services["worker"]["depends_on"]["ledger-migrate"] == {"condition": "service_completed_successfully"}
    assert f"CREATE ROLE {pipeline_role} LOGIN" in (INFRA / "postgres-init.sql").read_text()


# --------------------------------------------------------------------------- runner image


def test_runner_image_pins_what_the_tests_run():
    from packaging.requirements import Requirement

    dockerfile = (INFRA / "gpu-runner.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\w.\-]+$", dockerfile, re.M)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    [torch] = [d for d in deps if d.name == "torch"]
    assert f"ARG TORCH_VERSION={next(iter(torch.specifier)).version}" in dockerfile
    pins = {}
    for line in (INFRA / "requirements-runner.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            req = Requirement(line)
            [spec] = req.specifier
            assert spec.operator == "==", f"{line}: not pinned"
            pins[req.name.lower().replace("_", "-")] = spec.version
    for dep in deps:
        if dep.name != "torch":
            name = dep.name.lower().replace("_", "-")
            assert name in pins and dep.specifier.contains(pins[name], prereleases=True), f"{dep}: pinned {pins.get(name)}"
    assert "asyncpg" in pins and "prefect-kubernetes" in pins  # Prefect on PostgreSQL; the Kubernetes worker




def test_every_code_path_the_dvc_pipeline_depends_on_exists():
    """`dvc repro` fails on a dependency that moved (a stage's deps name the code it runs)."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    deps = {d for stage in stages.values() for d in stage.get("do", stage).get("deps", []) if not d.startswith(("data/", "${"))}
    assert deps, "dvc.yaml names no code dependency: was it parsed?"
    assert not sorted(d for d in deps if not (root / d).exists()), "dvc.yaml depends on paths that do not exist"
