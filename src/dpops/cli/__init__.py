"""The ``dpops`` command (Typer): thin calls into the pipeline, one exit code per outcome.
"""

from dpops.cli.app import app, main

__all__ = [
    "app",
    "main",
]
