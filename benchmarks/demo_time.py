"""Time the demo as a user runs it: `dpops run configs/jobs/sst2_lora.yaml` in a fresh workspace.

Writes benchmarks/results/demo_time.json: wall seconds of the whole command (Prefect start-up,
validation, training, evaluation, audit, MLflow), training seconds, accuracy, epsilon, cores.
Target (issue 2): under 600 s on 2 CPU cores, accuracy clearly above the majority class.

    .venv/bin/python benchmarks/demo_time.py [--job configs/jobs/sst2_lora.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="configs/jobs/sst2_lora.yaml")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/demo_time.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        summary_path = Path(home) / "summary.json"
        env = {**os.environ, "DPOPS_HOME": home}
        env.pop("DPOPS_LEDGER_URL", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        dpops = Path(sys.executable).parent / "dpops"
        start = time.perf_counter()
        proc = subprocess.run([str(dpops), "run", args.job, "--summary-json", str(summary_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-4000:])
            raise SystemExit(f"dpops run failed with exit code {proc.returncode}")
        summary = json.loads(summary_path.read_text())

    result = {
        "job": args.job,
        "wall_seconds": round(wall, 1),
        "train_seconds": round(summary["train_seconds"], 1),
        "steps": summary["steps"],
        "accuracy": summary["accuracy"],
        "majority_baseline": summary["majority_baseline"],
        "epsilon_run": summary["epsilon_run"],
        "cumulative_epsilon": summary["cumulative_epsilon"],
        "delta": summary["delta"],
        "decision": summary["decision"],
        "cpu_count": os.cpu_count(),
        "torch_threads": _torch_threads(),
        "machine": platform.platform(),
        "target_wall_seconds": 600,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
