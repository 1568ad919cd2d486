"""The shared stack on one machine: a real Prefect server on PostgreSQL, process workers, the
deployments of prefect.yaml, a PostgreSQL ledger, MLflow. Nothing mocked.

Two runs of the sst2 deployment are triggered at once against a budget that fits one: the first
trains through the ``dp-train/gpu`` deployment (on a process pool standing in for the GPU pool),
holding the dataset's concurrency slot; the second waits, then ends ``Refused`` with the ledger's
reason. The server's scheduler is also checked: the cron schedule produces scheduled runs, which
the ephemeral mode of ``dpops run`` never does.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)

from dpops.config import loading as config
from dpops.config.workspace import QUIET_ENV
from dpops.ledger.states import COMMITTED
from dpops.ledger.store import Ledger
from dpops.pipeline import planning as privacy
from dpops.pipeline import stages

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _database(prefix: str):
    """A fresh PostgreSQL database on the local server, dropped afterwards (skips without one)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect("host=127.0.0.1 port=5432 user=postgres dbname=test", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (CI must start it)")
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Processes:
    """Background processes of one test, each ended (by its own group) at teardown."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        for proc, log in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Prefect server (PostgreSQL), both work pools, the deployments of prefect.yaml, two workers."""
    tmp = tmp_path_factory.mktemp("stack")
    procs = _Processes(tmp)
    with _database("h_sched_prefect") as prefect_db, _database("h_sched_ledger") as ledger_db:
        port = _free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {
            **os.environ, **QUIET_ENV,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": api,
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:5432/{prefect_db}",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "DPOPS_SOURCE_DIR": str(ROOT),
            "DPOPS_HOME": str(tmp / "dpops-home"),
            "DPOPS_LEDGER_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{ledger_db}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
        }
        try:
            server = procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
            _wait_healthy(api, server, tmp / "server.log")
            for pool in ("dpops-cpu", "dpops-gpu"):  # process pools; production's dpops-gpu is Kubernetes
                subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, cwd=ROOT, check=True,
                               capture_output=True)
            deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT, capture_output=True, text=True)
            assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
            for pool in ("dpops-cpu", "dpops-gpu"):
                procs.start(f"worker-{pool}", [PREFECT, "worker", "start", "--pool", pool, "--type", "process"], env)
            yield {"env": env, "api": api, "tmp": tmp}
        finally:
            procs.stop()


@pytest.fixture
def prefect_client(stack):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack["api"]}), get_client(sync_client=True) as client:
        yield client


def _configs_fitting_one_run(tmp: Path) -> Path:
    """A copy of configs/ whose sst2 cap admits one smoke run, not two."""
    dst = tmp / "configs"
    shutil.copytree(ROOT / "configs", dst, dirs_exist_ok=True)
    job = config.load_job_config(dst / "jobs/sst2_smoke.yaml")
    ds = config.dataset_config_for(job, dst / "jobs/sst2_smoke.yaml")
    p = privacy.plan(dataset=ds, dp=job.dp, n_records=job.train_max_records + stages.audit_units(job))  # + canaries
    one, two = (p.filter.epsilon([p.mechanism] * k, delta=ds.privacy.delta) for k in (1, 2))
    path = dst / "datasets/sst2.yaml"
    data = yaml.safe_load(path.read_text())
    data["privacy"]["epsilon_cap"] = (one + two) / 2
    data["privacy"]["filter_orders"] = list(p.filter.orders)  # named: the filter does not move with the cap
    path.write_text(yaml.safe_dump(data))
    return dst


def _wait_final(client, run_ids, timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [client.read_flow_run(i) for i in run_ids]
        if all(r.state.is_final() for r in runs):
            return runs
        time.sleep(3)
    pytest.fail(f"flow runs not finished after {timeout} s: {[(r.name, r.state.name) for r in runs]}")


def _slots_while_training(client, limit: str, parents, timeout=600) -> int:
    """The dataset limit's occupied slots, read while a dp-train run is Running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["dp-train"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["RUNNING"]))),
        )
        if running:
            return client.read_global_concurrency_limit_by_name(limit).active_slots
        states = [client.read_flow_run(p).state for p in parents]
        if all(s.is_final() for s in states):
            pytest.fail(f"both runs ended before any training ran: {states}")
        time.sleep(1)
    pytest.fail("no dp-train run was seen running")


def test_deployments_train_on_the_pool_refuse_over_budget_and_schedule(stack, prefect_client):
    from prefect.deployments import run_deployment

    configs = _configs_fitting_one_run(stack["tmp"])
    params = {"job_path": str(configs / "jobs/sst2_smoke.yaml"), "policy_path": str(configs / "policy.yaml"), "repo": str(ROOT)}
    runs = [run_deployment("private-finetune/sst2-weekly", parameters=params, timeout=0) for _ in range(2)]
    assert _slots_while_training(prefect_client, "dpops-dataset-sst2", [r.id for r in runs]) == 1
    first, second = sorted(_wait_final(prefect_client, [r.id for r in runs]), key=lambda r: r.state.type.value != "COMPLETED")

    assert first.state.is_completed(), first.state
    assert second.state.is_cancelled() and second.state.name == "Refused"
    assert "'sst2': refused" in second.state.message and "Nothing was trained" in second.state.message
    assert prefect_client.read_global_concurrency_limit_by_name("dpops-dataset-sst2").active_slots == 0

    ledger = Ledger(stack["env"]["DPOPS_LEDGER_URL"])
    try:
        assert ledger.budget("sst2").charges == {"committed": 1}
        [event] = [e for e in ledger.history("sst2") if e["event"] == "committed"]
        charge = ledger.charge(event["charge"])
        assert charge.state == COMMITTED and charge.flow_run_id == str(first.id) and charge.steps_run == 5
        assert ledger.verify() == []
        spent = ledger.budget("sst2").spent
    finally:
        ledger.dispose()

    [train_run] = prefect_client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["dp-train"])))
    assert train_run.state.is_completed() and train_run.work_pool_name == "dpops-gpu"
    assert train_run.parameters["charge_id"] == charge.id and train_run.parent_task_run_id is not None

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(charge.mlflow_run_id)
    assert run.data.tags["dpops.charge_id"] == charge.id
    assert run.data.metrics["dataset_sst2_cumulative_epsilon"] == pytest.approx(spent)

    # The server's scheduler turned the weekly cron into scheduled runs (Mondays, 03:00 UTC).
    deployment = prefect_client.read_deployment_by_name("private-finetune/sst2-weekly")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
    deadline = time.monotonic() + 60
    while not (scheduled := prefect_client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["SCHEDULED"]))),
    )) and time.monotonic() < deadline:
        time.sleep(2)
    assert scheduled and all(
        (r.expected_start_time.weekday(), r.expected_start_time.hour, r.expected_start_time.minute) == (0, 3, 0) for r in scheduled
    )
