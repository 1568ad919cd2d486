"""The README's release inventory is complete: a real smoke run releases nothing it does not list.

The inventory (README, "Release inventory") classes every field a run releases, in MLflow, Prefect
and the ledger, as one of four classes. This test runs the real flow on the sst2 smoke job (real
Prefect test server, MLflow on SQLite, DVC, GX, Opacus), then reads back everything the run left
in MLflow and Prefect, and every column of the ledger's tables, and fails on any field the
inventory does not list, or lists as steward-only. It also scans every released value for the text
of a training record and for the plain hashes of the training file.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The four classes a released field may have (README, "Release inventory").
CLASSES = ("DP output", "post-processing", "declared public", "steward-only")

#: Where a field can be released; the inventory's first column.
PLACES = (
    "mlflow param", "mlflow metric", "mlflow tag", "mlflow artifact", "mlflow model version tag", "mlflow logged model tag",
    "mlflow logged model param", "mlflow experiment tag", "mlflow registered model",
    "prefect parameter", "prefect artifact", "prefect log", "prefect state",
    "ledger column", "ledger event", "cli", "file",
)


def inventory(readme: Path = ROOT / "README.md") -> list[tuple[str, str, str]]:
    """(place, field pattern, class) of every row of the README's release inventory tables.

    The section runs from the heading "## Release inventory" to the next "## " heading; every
    table row in it whose first cell is a place of :data:`PLACES` is an entry. A field pattern
    may hold ``<name>`` placeholders and ``*`` wildcards.
    """
    text = readme.read_text()
    start = text.index("\n## Release inventory")
    end = text.find("\n## ", start + 1)
    rows = []
    for line in text[start:end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] in PLACES:
            for field in cells[1].split(","):
                rows.append((cells[0], field.strip().strip("`"), cells[2]))
    return rows


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, re.sub(r"<[^>]+>", "*", pattern))


def _entry(entries, place: str, name: str):
    return next((e for e in entries if e[0] == place and _matches(e[1], name)), None)


def test_every_inventory_entry_has_one_of_the_four_classes():
    entries = inventory()
    assert len(entries) > 40, "the release inventory is missing or was not parsed"
    bad = [e for e in entries if e[2] not in CLASSES]
    assert not bad, f"inventory entries whose class is not one of {CLASSES}: {bad}"
    for place in ("mlflow param", "mlflow metric", "mlflow tag", "mlflow artifact", "prefect parameter", "prefect artifact",
                  "prefect log", "ledger column", "cli"):
        assert any(e[0] == place for e in entries), f"the inventory lists nothing for {place!r}"


def test_every_ledger_column_is_in_the_inventory():
    from dpops.ledger.schema import Base

    entries = inventory()
    missing = [f"{t.name}.{c.name}" for t in Base.metadata.sorted_tables for c in t.columns
               if _entry(entries, "ledger column", f"{t.name}.{c.name}") is None]
    assert not missing, f"ledger columns the inventory does not class: {missing}"


def test_the_parser_rejects_what_it_should():
    """The checks above can fail: an unknown class and an unlisted field are caught."""
    entries = [("mlflow param", "job.*", "declared public"), ("mlflow metric", "dataset_<name>_cumulative_epsilon", "DP output")]
    assert _entry(entries, "mlflow param", "job.dp.steps") is not None
    assert _entry(entries, "mlflow metric", "dataset_sst2_cumulative_epsilon") is not None
    assert _entry(entries, "mlflow metric", "train_loss") is None
    assert _entry(entries, "mlflow tag", "job.dp.steps") is None


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _released_by_mlflow(tracking_uri: str, run_id: str, model_name: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(place, field) of everything MLflow holds about the run, and every value as text."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    fields = [("mlflow param", k) for k in run.data.params] + [("mlflow metric", k) for k in run.data.metrics]
    fields += [("mlflow tag", k) for k in run.data.tags]
    values = [*map(str, run.data.params.values()), *map(str, run.data.tags.values())]
    experiment = client.get_experiment(run.info.experiment_id)
    fields += [("mlflow experiment tag", k) for k in experiment.tags]
    values += [str(v) for v in experiment.tags.values()]

    root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=tracking_uri))
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        fields.append(("mlflow artifact", path.relative_to(root).as_posix()))
        values.append(path.read_bytes().decode("utf-8", errors="ignore"))
    for version in client.search_model_versions(f"name='{model_name}'"):
        fields += [("mlflow model version tag", k) for k in version.tags]
        values += [str(v) for v in version.tags.values()]
        values.append(str(version.description or ""))
    fields.append(("mlflow registered model", model_name))
    for model in client.search_logged_models(experiment_ids=[run.info.experiment_id]):
        fields += [("mlflow logged model tag", k) for k in (model.tags or {})]
        fields += [("mlflow logged model param", k) for k in (model.params or {})]
        values += [str(v) for v in (model.tags or {}).values()] + [str(v) for v in (model.params or {}).values()]
        model_root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location))
        for path in sorted(p for p in model_root.rglob("*") if p.is_file()):
            fields.append(("mlflow artifact", "model/" + path.relative_to(model_root).as_posix()))
            values.append(path.read_bytes().decode("utf-8", errors="ignore"))
    return fields, values


def _flat(prefix: str, value, out: list[str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    else:
        out.append(prefix)


def _released_by_prefect() -> tuple[list[tuple[str, str]], list[str]]:
    """(place, field) of every flow run's parameters, artifacts, log lines and states, and their text."""
    from prefect import get_client

    fields, values = [], []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs():
            names: list[str] = []
            for key, value in run.parameters.items():
                _flat(key, value, names)
            fields += [("prefect parameter", n) for n in names]
            values.append(repr(run.parameters))
            if run.state is not None:
                fields.append(("prefect state", run.state.type.value))
                values.append(str(run.state.message or ""))
        for artifact in client.read_artifacts():
            fields.append(("prefect artifact", artifact.key or "(no key)"))
            values += [str(artifact.data), str(artifact.description or "")]
        for log in client.read_logs():
            fields.append(("prefect log", log.name))
            values.append(log.message)
    return fields, values


def _released_by_ledger(url: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(place, field) of every event's payload keys, as ``<kind>.<key>``, and the payloads."""
    from dpops.ledger.store import Ledger

    ledger = Ledger(url)
    try:
        fields, values = [], []
        for dataset in ledger.datasets():
            for event in ledger.history(dataset):
                fields += [("ledger event", f"{event['event']}.{key}") for key in (event.get("payload") or {})]
                values.append(repr(event))
        return fields, values
    finally:
        ledger.dispose()


@pytest.mark.slow
def test_a_smoke_run_releases_only_what_the_inventory_lists(prefect_harness, workspace_env, configs_dir, tmp_path, project_root,
                                                            monkeypatch):
    from dpops.config import loading as config
    from flows.private_finetune import private_finetune

    # as `dpops run` does: dpops's own log lines then reach Prefect's logs
    monkeypatch.setattr(logging.getLogger("dpops"), "level", logging.INFO)
    configs = configs_dir
    job_path = configs / "jobs/sst2_smoke.yaml"
    summary = private_finetune(job_path=str(job_path), policy_path=str(configs / "policy.yaml"), repo=str(project_root))

    job = config.load_job_config(job_path)
    fields, values = _released_by_mlflow(f"sqlite:///{workspace_env / 'mlflow.db'}", summary["mlflow_run_id"],
                                         job.registered_model)
    p_fields, p_values = _released_by_prefect()
    l_fields, l_values = _released_by_ledger(f"sqlite:///{workspace_env / 'ledger.db'}")
    fields, values = fields + p_fields + l_fields, values + p_values + l_values
    assert any(f[0] == "prefect parameter" for f in fields) and any(f[0] == "prefect log" for f in fields)

    entries = inventory()
    unlisted = sorted({f for f in fields if _entry(entries, *f) is None})
    assert not unlisted, f"released but not in the README's release inventory: {unlisted}"
    steward = sorted({f for f in fields if _entry(entries, *f)[2] == "steward-only"})
    assert not steward, f"steward-only fields released to MLflow or Prefect: {steward}"

    # No value released anywhere holds the text of a training record, or a plain hash of the training file.
    train_file = project_root / "data/prepared/sst2/train.tsv"
    raw = train_file.read_bytes()
    texts = [line.split("\t", 1)[1] for line in raw.decode().splitlines()[1:job.train_max_records + 1]]
    long_texts = [t for t in texts if len(t) >= 25]
    assert len(long_texts) > 500
    blob = "\n".join(values)
    leaked = [t for t in long_texts if t in blob]
    assert not leaked, f"{len(leaked)} training record(s) appear in released values"
    for digest in (hashlib.sha256(raw).hexdigest(), hashlib.md5(raw).hexdigest()):
        assert digest not in blob, "a plain hash of the private training file was released"
