"""Small helpers shared by the tests."""

import re
from pathlib import Path

import yaml


def edit_yaml(path: Path, fn) -> None:
    """Load the YAML file at ``path``, let ``fn`` change the data in place, write it back."""
    data = yaml.safe_load(Path(path).read_text())
    fn(data)
    Path(path).write_text(yaml.safe_dump(data))


def steward_file(message: str) -> Path:
    """The steward-only file a validation error points to (it holds the first offending rows)."""
    return Path(re.search(r"for the data steward only: (\S+\.txt)\.", message).group(1))
