"""Small helpers shared by the tests."""

from pathlib import Path

import yaml


def edit_yaml(path: Path, fn) -> None:
    """Load the YAML file at ``path``, let ``fn`` change the data in place, write it back."""
    data = yaml.safe_load(Path(path).read_text())
    fn(data)
    Path(path).write_text(yaml.safe_dump(data))


def policy_accepting_inconclusive(directory: Path) -> str:
    """A policy file that accepts an INCONCLUSIVE audit, so that plan admits a job whose canaries
    are too few to test its epsilon (tests that train with 10 canaries for speed); returns its path."""
    path = Path(directory) / "policy_accepting_inconclusive.yaml"
    path.write_text(yaml.safe_dump({"min_accuracy": 0.0, "accept_inconclusive": True}))
    return str(path)
