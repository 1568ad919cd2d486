"""Privacy hygiene: after real runs, no training text is anywhere the system writes.

`dpops run` runs the smoke job of each of the three datasets in one fresh process (real Prefect
ephemeral server, MLflow on SQLite, DVC, GX, Opacus), with the dpops workspace, PREFECT_HOME and
TMPDIR all under the test's directory. Then every file there (SQLite databases read row by row,
other files byte by byte), every MLflow param and tag, and the process's captured output are
searched for samples of the records the runs read.
"""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dpops.config import loading as config
from dpops.ledger.states import COMMITTED
from dpops.ledger.store import Ledger

pytestmark = pytest.mark.slow

JOBS = ["sst2_smoke", "medical_abstracts_smoke", "twitter_financial_news_smoke"]
DRIVER = "import sys\nfrom dpops.cli import app\nfor job in sys.argv[1:]:\n    assert not app(['run', job], standalone_mode=False)\n"


def _samples(root: Path, job_name: str, k: int = 40) -> list[str]:
    """Fragments (first 60 characters) of records the job read: training records and hold-out."""
    import pandas as pd

    job = config.load_job_config(root / f"configs/jobs/{job_name}.yaml")
    ds = config.dataset_config_for(job, root / f"configs/jobs/{job_name}.yaml")
    out = []
    for path, limit in ((ds.files.train, job.train_max_records), (ds.files.holdout, None)):
        df = pd.read_csv(root / path, sep="\t", dtype=str, keep_default_na=False, quoting=3, nrows=limit)
        texts = df["text"][df["text"].str.len() >= 30]
        out += [t[:60] for t in texts.sample(n=min(k, len(texts)), random_state=0)]
    return out


def _sqlite_text(path: Path) -> str:
    """Every value of every table: a long value may span pages, so bytes alone could miss it."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return "\n".join(str(v) for t in tables for row in con.execute(f'SELECT * FROM "{t}"') for v in row)
    finally:
        con.close()


def _corpus(root: Path) -> list[tuple[str, str]]:
    """(file, text) for every file under ``root``; SQLite files as their values, others decoded."""
    out = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        raw = path.read_bytes()
        text = _sqlite_text(path) if raw.startswith(b"SQLite format 3\x00") else raw.decode("utf-8", errors="replace")
        out.append((str(path.relative_to(root)), text))
    return out


def _leaks(corpus: list[tuple[str, str]], samples: list[str]) -> list[tuple[str, str]]:
    return [(name, s[:20]) for name, text in corpus for s in samples if s in text]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    root = Path(__file__).resolve().parent.parent
    if not all((root / f"data/prepared/{d}/train.tsv").exists() for d in ("sst2", "medical_abstracts", "twitter_financial_news")):
        pytest.fail("prepared data missing: run `dvc pull` and `dvc repro` first")
    base = tmp_path_factory.mktemp("hygiene")
    (base / "tmp").mkdir()
    env = {**os.environ, "DPOPS_HOME": str(base / "home"), "PREFECT_HOME": str(base / "prefect"), "TMPDIR": str(base / "tmp"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300", "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    for key in ("DPOPS_LEDGER_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, *(f"configs/jobs/{j}.yaml" for j in JOBS)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, base, proc.stdout + proc.stderr


def test_each_dataset_runs_with_its_own_budget(three_runs):
    root, base, _ = three_runs
    ledger = Ledger(f"sqlite:///{base / 'home/ledger.db'}")
    for job_name in JOBS:
        job = config.load_job_config(root / f"configs/jobs/{job_name}.yaml")
        ds = config.dataset_config_for(job, root / f"configs/jobs/{job_name}.yaml")
        budget = ledger.budget(ds.name)
        assert (budget.epsilon_cap, budget.delta, budget.charges) == (ds.privacy.epsilon_cap, ds.privacy.delta, {COMMITTED: 1})
        assert 0 < budget.spent < budget.epsilon_cap
    assert ledger.verify() == []


def test_no_training_text_in_files_mlflow_prefect_or_logs(three_runs):
    root, base, output = three_runs
    samples = [s for job in JOBS for s in _samples(root, job)]
    corpus = _corpus(base) + [("captured output", output)]
    assert len(corpus) > 10 and any(name.endswith("prefect.db") for name, _ in corpus)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base / 'home/mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 3
    corpus += [(f"mlflow run {r.info.run_id}", "\n".join([*r.data.params.values(), *r.data.tags.values()])) for r in runs]

    # the scan finds a record where one is (a negative control for the search itself)
    planted = base / "tmp" / "planted.db"
    with sqlite3.connect(planted) as con:
        con.execute("CREATE TABLE t (v TEXT)")
        con.execute("INSERT INTO t VALUES (?)", (samples[0] * 100,))
    assert _leaks(_corpus(base / "tmp"), samples[:1])
    planted.unlink()

    assert _leaks(corpus, samples) == []
