"""Config files load into validated models; errors name the file and the field."""

from pathlib import Path

import pytest
import yaml

from dpops.config import loading as config
from dpops.errors import ConfigError


def test_project_configs_load(project_root):
    for job in (project_root / "configs/jobs").glob("*.yaml"):
        j = config.load_job_config(job)
        ds = config.dataset_config_for(j, job)
        assert ds.name == j.dataset
    assert config.load_policy(project_root / "configs/policy.yaml").alias == "production"


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "configs" / "datasets" / "x.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


GOOD = {
    "name": "x", "files": {"train": "a", "holdout": "b", "eval": "c"}, "text_column": "text",
    "label_column": "label", "labels": ["0", "1"], "privacy": {"epsilon_cap": 5.0, "delta": 1e-6},
}


@pytest.mark.parametrize(
    "change,field",
    [
        ({"privacy": {"epsilon_cap": 0, "delta": 1e-6}}, "privacy.epsilon_cap"),
        ({"privacy": {"epsilon_cap": -1, "delta": 1e-6}}, "privacy.epsilon_cap"),
        ({"privacy": {"epsilon_cap": 5, "delta": 1.5}}, "privacy.delta"),
        ({"labels": ["0"]}, "labels"),
        ({"unit": "household"}, "unit"),
        ({"colour": "blue"}, "colour"),
        ({"name": "Bad Name"}, "name"),
        ({"blocks": {}}, "blocks.column"),
        ({"blocks": {"column": "month", "colour": "blue"}}, "blocks.colour"),
        ({"blocks": {"column": "month", "epsilon_cap": 0}}, "blocks.epsilon_cap"),
        ({"blocks": {"column": "month", "epsilon_cap": 6.0}}, "blocks.epsilon_cap"),  # above privacy.epsilon_cap
        ({"blocks": {"column": "label"}}, "blocks.column"),
    ],
)
def test_bad_dataset_fields_are_named(tmp_path, change, field):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(ConfigError) as err:
        config.load_dataset_config(path)
    assert str(path) in str(err.value) and f"field '{field}'" in str(err.value)


def test_good_dataset_loads(tmp_path):
    assert config.load_dataset_config(_write(tmp_path, GOOD)).privacy.delta == 1e-6


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        config.load_job_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load_job_config(bad)


def test_job_refuses_non_poisson_sampler(tmp_path, project_root):
    data = yaml.safe_load((project_root / "configs/jobs/sst2_lora.yaml").read_text())
    data["dp"]["sampler"] = "shuffle"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="field 'dp.sampler'"):
        config.load_job_config(path)


def _job_with_dataset(tmp_path, dataset: dict, **job) -> Path:
    _write(tmp_path, {**GOOD, **dataset})
    path = tmp_path / "configs" / "jobs" / "j.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "j", "dataset": "x", "registered_model": "m", **job,
                                    "dp": {"target_epsilon": 1.0, **job.get("dp", {})}}))
    return path


def test_blocks_of_a_job_and_its_dataset(tmp_path):
    partitioned = {"blocks": {"column": "month"}}
    path = _job_with_dataset(tmp_path, partitioned)
    job = config.load_job_config(path)
    ds = config.dataset_config_for(job, path)
    assert config.blocks_mode(job, ds) == "all" and ds.block_cap == 5.0  # defaults: every block, the dataset's cap
    path = _job_with_dataset(tmp_path, {"blocks": {"column": "month", "epsilon_cap": 2.0}}, dp={"blocks": "fresh"})
    job = config.load_job_config(path)
    ds = config.dataset_config_for(job, path)
    assert config.blocks_mode(job, ds) == "fresh" and ds.block_cap == 2.0
    assert config.blocks_mode(job, config.load_dataset_config(_write(tmp_path, GOOD))) is None

    with pytest.raises(ConfigError, match=r"j\.yaml: field 'dp\.blocks'"):
        config.load_job_config(_job_with_dataset(tmp_path, partitioned, dp={"blocks": "sometimes"}))
    path = _job_with_dataset(tmp_path, partitioned, train_max_records=10)
    with pytest.raises(ConfigError, match=r"j\.yaml: field 'train_max_records' cannot be used.*x\.yaml, field 'blocks'"):
        config.dataset_config_for(config.load_job_config(path), path)
    path = _job_with_dataset(tmp_path, {}, dp={"blocks": "all"})
    with pytest.raises(ConfigError, match=r"j\.yaml: field 'dp\.blocks' is 'all'.*x\.yaml has no field 'blocks'"):
        config.dataset_config_for(config.load_job_config(path), path)
