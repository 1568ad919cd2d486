"""Counts, for one smoke run in-process, how often the run opens the ledger, loads the trained model
and parses the job file; writes benchmarks/results/run_context.json.

    python benchmarks/run_context.py [JOB] [POLICY]

Runs ``flows.private_finetune`` on ``configs/jobs/sst2_smoke.yaml`` (default) in a fresh temporary
``DPOPS_HOME``, with counters on ``Ledger.__init__``, ``dpops.models.hf.load`` and the job loader.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    job = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "configs/jobs/sst2_smoke.yaml")
    policy = sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "configs/policy.yaml")
    os.environ["DPOPS_HOME"] = tempfile.mkdtemp(prefix="dpops-run-context-")
    from dpops.config import loading, spec
    from dpops.ledger.store import Ledger
    from dpops.models import hf

    counts: collections.Counter = collections.Counter()

    def counting(name, real):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return wrapped

    real_init = Ledger.__init__
    Ledger.__init__ = lambda self, *a, **k: (counts.update(["ledger_opened"]), real_init(self, *a, **k))[1]
    hf.load = counting("model_loaded", hf.load)
    loading.load_job_config = spec.load_job_config = counting("job_parsed", loading.load_job_config)
    from flows.private_finetune import private_finetune

    private_finetune(job_path=job, policy_path=policy)
    out = ROOT / "benchmarks/results/run_context.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"job": Path(job).name, "counts": dict(counts)}, indent=2))
    print(out.read_text())


if __name__ == "__main__":
    main()
