"""Reading configs: strict YAML files into the models, and the checks that span a job and its dataset.

A file that is missing, not UTF-8, not YAML, repeats a key or breaks a model's rule raises
:class:`~dpops.errors.ConfigError` naming the file and the field. :func:`dataset_config_for` finds
a job's dataset config beside it (``configs/datasets/<name>.yaml``) and refuses a job that asks of
it what it cannot give; :func:`check_training` refuses training settings the trainer would refuse
for that dataset, so both fail before anything is charged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from dpops.config.policy import PolicyConfig
from dpops.config.schema import DatasetConfig, JobConfig
from dpops.errors import ConfigError


class _DuplicateKey(yaml.YAMLError):
    """A mapping names one key twice (PyYAML would silently keep the last value)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key repeated in one mapping at any depth.

    A repeated key is most often an edit that did not take (a second ``epsilon_cap:`` further
    down): silently keeping the last value would register or train on a term nobody reviewed.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, as YAML allows
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: let PyYAML report it
                continue
            if first != key_node.start_mark.line + 1:
                raise _DuplicateKey(f"key {str(key)[:100]!r} appears twice in one mapping (lines {first} and "
                                    f"{key_node.start_mark.line + 1}); keep one")
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping in a YAML config file; ConfigError naming the file when it is missing, a
    directory, not UTF-8, not YAML, repeats a key or is not a mapping."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: byte {exc.start} (line {line}) is not valid UTF-8; save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def _parse(model: type[BaseModel], path: Path) -> Any:
    data = _read_yaml(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(root)'}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None


def load_dataset_config(path: str | Path) -> DatasetConfig:
    return _parse(DatasetConfig, Path(path))


def load_job_config(path: str | Path) -> JobConfig:
    return _parse(JobConfig, Path(path))


def load_policy(path: str | Path) -> PolicyConfig:
    return _parse(PolicyConfig, Path(path))


def configs_root(job_path: str | Path) -> Path:
    """The ``configs/`` directory of a job file (``configs/jobs/x.yaml`` -> ``configs/``)."""
    return Path(job_path).resolve().parent.parent


def dataset_config_for(job: JobConfig, job_path: str | Path) -> DatasetConfig:
    path = configs_root(job_path) / "datasets" / f"{job.dataset}.yaml"
    cfg = load_dataset_config(path)
    if cfg.name != job.dataset:
        raise ConfigError(f"{path}: field 'name' is {cfg.name!r} but the job asks for dataset {job.dataset!r}")
    if job.dp.blocks is not None and cfg.blocks is None:
        raise ConfigError(
            f"{job_path}: field 'dp.blocks' is {job.dp.blocks!r}, but dataset {cfg.name!r} is not partitioned into "
            f"blocks ({path} has no field 'blocks')"
        )
    if cfg.blocks is not None and job.train_max_records is not None:
        raise ConfigError(
            f"{job_path}: field 'train_max_records' cannot be used with dataset {cfg.name!r}, which is partitioned "
            f"into blocks ({path}, field 'blocks'): a run reads whole blocks, at the counts the ledger registered"
        )
    return cfg


def blocks_mode(job: JobConfig, dataset: DatasetConfig) -> Optional[str]:
    """Which blocks a run reads: 'all' or 'fresh' on a partitioned dataset, None otherwise."""
    if dataset.blocks is None:
        return None
    return job.dp.blocks or "all"


def check_training(job: JobConfig, dataset: DatasetConfig, job_path: str | Path) -> None:
    """Refuse, on load and so before anything is charged, training settings the trainer refuses for ``dataset``.

    Unit 'user' sums each sampled user's per-record gradients before clipping, which needs every
    per-example gradient of a batch in one process (:mod:`dpops.train.user_level`).

    Raises:
        ConfigError: naming the job file and the field.
    """
    if dataset.unit != "user":
        return
    if job.training.nproc_per_node > 1:
        raise ConfigError(
            f"{job_path}: field 'training.nproc_per_node' is {job.training.nproc_per_node}, but dataset {dataset.name!r} "
            "has unit 'user', which trains in one process (a user's records are clipped together). Use 1."
        )
    if job.grad_sample_mode != "hooks":
        raise ConfigError(
            f"{job_path}: field 'training.grad_sample_mode' is {job.grad_sample_mode!r} (method {job.method!r}), but dataset "
            f"{dataset.name!r} has unit 'user', which needs per-example gradients. Set 'hooks'."
        )
