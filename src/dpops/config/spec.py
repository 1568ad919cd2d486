"""One run's resolved configuration: the job and its dataset, loaded once, frozen, with a digest.

A private fine-tune reads its job file at several stages, and the train stage may run in another
process or on another machine (a ``dp-train`` deployment, torchrun's processes). The reservation
stores :attr:`RunSpec.digest` on the charge, and every process that trains loads the spec again
and refuses to start if its digest differs (:func:`dpops.pipeline.stages.train`,
:func:`dpops.pipeline.worker.running_charge`): an edit to the job or dataset file between plan and
train (a new learning rate, another model, another split) is refused instead of being trained
under a charge made for the old one.

The digest is of public configuration only (the two validated configs, as canonical JSON); it
says nothing about the records.

>>> a = RunSpec.digest_of({"b": 1, "a": [1.0, "x"]})
>>> a == RunSpec.digest_of({"a": [1.0, "x"], "b": 1}) and a.startswith("sha256:")
True
>>> a == RunSpec.digest_of({"a": [1.0, "y"], "b": 1})
False
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from dpops.config.loading import check_training, configs_root, dataset_config_for, load_job_config
from dpops.config.schema import DatasetConfig, JobConfig
from dpops.errors import ConfigError

#: The digest's scheme, stored with it: a later canonical form gets a new name.
SCHEME = "sha256"


class RunSpec(BaseModel):
    """The validated job and dataset configs of one run (immutable)."""

    model_config = ConfigDict(frozen=True)

    job_path: str
    job: JobConfig
    dataset: DatasetConfig

    @classmethod
    def load(cls, job_path: str | Path) -> "RunSpec":
        """Read, validate and cross-check the job file and its dataset config.

        Raises:
            ConfigError: naming the file and the field; nothing has been charged or trained.
        """
        path = Path(job_path)
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "no such file"
            raise ConfigError(f"{job_path}: {why}; expected a job file (YAML). Nothing was charged or trained.")
        job = load_job_config(path)
        ds_file = configs_root(path) / "datasets" / f"{job.dataset}.yaml"
        if not ds_file.is_file():
            raise ConfigError(f"{job_path}: field 'dataset' = {job.dataset!r}: no dataset config {ds_file} "
                              f"({'a directory' if ds_file.is_dir() else 'no such file'}). Nothing was charged or trained.")
        ds = dataset_config_for(job, path)
        check_training(job, ds, path)  # from stage 1 on: refused before anything is charged
        return cls(job_path=str(job_path), job=job, dataset=ds)

    @property
    def canonical(self) -> dict[str, Any]:
        """What the digest covers: both configs as validated (defaults filled in), not the path."""
        return {"job": self.job.model_dump(mode="json"), "dataset": self.dataset.model_dump(mode="json")}

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of :attr:`canonical` as canonical JSON (sorted keys, no whitespace)."""
        return self.digest_of(self.canonical)

    @staticmethod
    def digest_of(value: Any) -> str:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return f"{SCHEME}:{hashlib.sha256(text.encode()).hexdigest()}"
