"""The MLflow review as a user sees it: a real `mlflow server` on loopback, the whole flow on the
smoke job, then the run page and the model version page rendered by headless Chromium.

The MLflow UI is a React app, so the page is rendered with JavaScript (``--dump-dom`` after a
virtual time budget) before asserting what a reviewer reads: epsilon, cumulative epsilon and the
gate decision. Screenshots go to tmp_path and, when it exists, benchmarks/results/mlflow_ui/.
Finally `dpops predict` loads the `production` alias and prints labels.
"""

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dpops.cli.app import app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"mlflow server exited: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not answer /health within 180 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _render(url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran, and a screenshot of it."""
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout


def _keep(paths, project_root):
    results = project_root / "benchmarks" / "results"
    if results.is_dir():
        (results / "mlflow_ui").mkdir(exist_ok=True)
        for p in paths:
            shutil.copy(p, results / "mlflow_ui" / p.name)


def _assert_no_training_text(text: str, project_root: Path) -> None:
    """No training sentence (of the smoke job's first 2,000) appears in the audit's reports."""
    import pandas as pd

    train = pd.read_csv(project_root / "data/prepared/sst2/train.tsv", sep="\t", nrows=2000)
    leaked = [t for t in train["text"].astype(str) if len(t) > 15 and t in text]
    assert leaked == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_reviewer_sees_epsilon_cumulative_epsilon_and_gate_decision(
    mlflow_server, workspace_env, configs_dir, tmp_path, project_root, monkeypatch
):
    from prefect.testing.utilities import prefect_test_harness

    from flows.private_finetune import private_finetune

    if not (project_root / "data/prepared/sst2/train.tsv").exists():
        pytest.fail("data/prepared/sst2 is missing: run `make data` (dvc pull + dvc repro) first")
    configs = configs_dir
    policy = yaml.safe_load((configs / "policy.yaml").read_text())
    (configs / "policy.yaml").write_text(yaml.safe_dump({**policy, "min_accuracy": 0.0}))  # 5 steps: utility is not the point
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    with prefect_test_harness(server_startup_timeout=120):
        summary = private_finetune(job_path=str(configs / "jobs/sst2_smoke.yaml"), policy_path=str(configs / "policy.yaml"),
                                   repo=str(project_root))
        from prefect.artifacts import Artifact

        prefect_report = Artifact.get("dpops-audit")
    assert summary["decision"] == "PROMOTED", summary["reasons"]
    assert prefect_report is not None and "dpops privacy audit: PASS" in prefect_report.data

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "audit")} == {"audit/audit.json", "audit/audit.md", "audit/audit.png"}
    report = client.download_artifacts(run.info.run_id, "audit/audit.json", str(tmp_path))
    _assert_no_training_text(Path(report).read_text() + prefect_report.data, project_root)
    epsilon, cumulative = run.data.tags["dpops.epsilon"], run.data.tags["dpops.cumulative_epsilon"]
    run_png, version_png = tmp_path / "mlflow_run.png", tmp_path / "mlflow_model_version.png"
    run_page = _render(f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", run_png)
    name, version = summary["model"].split(" v")
    version_page = _render(f"{mlflow_server}/#/models/{name}/versions/{version}", version_png)
    _keep([run_png, version_png], project_root)

    for page in (run_page, version_page):
        assert epsilon in page and cumulative in page and "PROMOTED" in page
    assert "dpops.cumulative_epsilon" in run_page and "epsilon_run" in run_page
    assert run_png.stat().st_size > 10_000 and version_png.stat().st_size > 10_000

    predicted = CliRunner().invoke(app, ["predict", "--model", name, "a wonderful film", "a dull, tedious mess"])
    assert predicted.exit_code == 0, predicted.output
    labels = predicted.output.split()
    assert len(labels) == 2 and set(labels) <= {"0", "1"}
    assert "wonderful" not in predicted.output  # labels only, never the texts
