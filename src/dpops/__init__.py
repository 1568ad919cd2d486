"""dpops: recurring differentially private fine-tunes with a privacy-budget ledger.

The library is plain Python: it never imports Prefect. Flows (``flows/``) and tasks (``tasks/``)
are thin callers of the functions here, and so is the CLI (:mod:`dpops.cli`).
"""

__version__ = "0.1.0"
