"""What a user writes: job and dataset configs (:mod:`.schema`), the promotion policy (:mod:`.policy`), read
from YAML by :mod:`.loading`, and the workspace (:mod:`.workspace`).

Validated with pydantic; a mistake is a :class:`~dpops.errors.ConfigError` naming the file and field.
"""

from dpops.config.loading import check_training, dataset_config_for, load_dataset_config, load_job_config, load_policy
from dpops.config.policy import PolicyConfig
from dpops.config.schema import DatasetConfig, JobConfig
from dpops.config.workspace import Workspace, workspace

__all__ = [
    "DatasetConfig",
    "JobConfig",
    "PolicyConfig",
    "Workspace",
    "check_training",
    "dataset_config_for",
    "load_dataset_config",
    "load_job_config",
    "load_policy",
    "workspace",
]
