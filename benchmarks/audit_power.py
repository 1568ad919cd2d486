"""Negative controls of the audit at the demo's q and steps: can it fail a broken run?

Seeded repetitions of one small job through the real stages (plan, reserve, train with both kinds
of canaries, settle, audit), each in a fresh workspace, under three controls:

* ``no_noise``: the DP optimizer's noise generator returns zeros (clipping kept);
* ``half_sigma``: it draws noise at half the planned standard deviation;
* ``correct``: DP-SGD as planned.

The bugs are planted where a real one would hide: inside Opacus's noise generation, while the
optimizer still reports the planned noise multiplier (so the trainer's own record and the
accountant cross-check cannot see them; only the canaries can). The job is the demo's mechanism
(q = 128 / (65,947 + 6,000), 150 steps, epsilon 3 at delta 1e-6, 1,000 input and 5,000 gradient
canaries) on a small model: a one-layer BERT (random weights, MiniLM's tokenizer) with LoRA, and
as many SST-2 records as keep q at the demo's value with a batch of about 16.

Targets (issue 17): no_noise FAIL 10 of 10, half_sigma FAIL at least 9 of 10, correct PASS 10 of 10.
Writes benchmarks/results/audit_power.json.

    .venv/bin/python benchmarks/audit_power.py [--runs 10] [--records 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # dpops, and tests.tiny_models

#: The demo job's sample rate and steps (configs/jobs/sst2_lora.yaml: q = 1 / ceil(n / B), n = 65,947
#: records + 6,000 canaries, B = 128).
DEMO_Q = 1 / math.ceil((65_947 + 1_000 + 5_000) / 128)
DEMO_STEPS = 150
CONTROLS = {"no_noise": 0.0, "half_sigma": 0.5, "correct": 1.0}


def tiny_model(out: Path) -> Path:
    """The negative controls' model of the tests (tests/test_audit_controls.py): a one-layer BERT."""
    from tests.tiny_models import tiny_bert

    return tiny_bert(out, hidden_size=256, layers=1, intermediate_size=512)


def write_job(configs: Path, model_dir: Path, records: int, canaries: int, gradient_canaries: int) -> Path:
    import yaml

    job = configs / "jobs" / "audit_power.yaml"
    data = yaml.safe_load((configs / "jobs" / "sst2_smoke.yaml").read_text())
    n = records + canaries + gradient_canaries
    batch = max(1, round(DEMO_Q * n))
    if 1 / math.ceil(n / batch) != DEMO_Q:
        raise SystemExit(f"no whole batch size gives the demo's q = {DEMO_Q:.4g} with n = {n}: change --records")
    data.update(
        name="audit-power", registered_model="audit-power", train_max_records=records,
        model={"path": str(model_dir), "max_length": 16},
        dp={"target_epsilon": 3.0, "expected_batch_size": batch, "steps": DEMO_STEPS, "max_grad_norm": 1.0},
        optim={"learning_rate": 0.005}, audit={"canaries": canaries, "gradient_canaries": gradient_canaries},
        lora={"r": 8, "target_modules": ["query", "value"]},
    )
    job.write_text(yaml.safe_dump(data))
    return job


@contextmanager
def planted_noise(factor: float):
    """Opacus draws noise at ``factor`` times the planned std (1: untouched); its optimizer still says sigma."""
    import opacus.optimizers.optimizer as opt

    real = opt._generate_noise
    if factor != 1.0:
        opt._generate_noise = lambda std, reference, *args, **kwargs: (
            real(std * factor, reference, *args, **kwargs) if factor else reference.new_zeros(reference.shape))
    try:
        yield
    finally:
        opt._generate_noise = real


def one_run(job: Path, factor: float) -> dict:
    from dpops.pipeline import stages

    with tempfile.TemporaryDirectory() as home:
        os.environ["DPOPS_HOME"] = home
        ref = stages.resolve(str(job), str(ROOT))
        plan = stages.plan(str(job), ref)
        charge_id = stages.reserve(str(job), ref, plan)
        with planted_noise(factor):
            trained = stages.train(str(job), ref, plan, charge_id)
        stages.settle(charge_id, trained["steps_run"])
        out = stages.audit(str(job), plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"],
                           trained=trained, charge_id=charge_id)
    keys = ("verdict", "decided_by", "claimed_epsilon", "ceiling", "white_box_epsilon_lower_bound", "white_box_ceiling",
            "noise_multiplier_upper", "canary_epsilon_lower_bound", "canary_ceiling")
    return {**{k: out[k] for k in keys}, "sample_rate": plan["sample_rate"], "noise_multiplier": plan["noise_multiplier"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10, help="repetitions per control")
    parser.add_argument("--records", type=int, default=3000, help="SST-2 training records (q stays the demo's)")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--gradient-canaries", type=int, default=5000)
    parser.add_argument("--controls", default=",".join(CONTROLS), help="comma-separated subset of " + ", ".join(CONTROLS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/audit_power.json"))
    args = parser.parse_args()
    controls = {name: CONTROLS[name] for name in args.controls.split(",")}
    for key, value in (("DVC_NO_ANALYTICS", "1"), ("MLFLOW_DISABLE_TELEMETRY", "true")):
        os.environ.setdefault(key, value)

    work = Path(tempfile.mkdtemp(prefix="audit-power-"))
    try:
        shutil.copytree(ROOT / "configs", work / "configs")
        job = write_job(work / "configs", tiny_model(work / "tiny-bert"), args.records, args.canaries, args.gradient_canaries)
        runs: dict[str, list[dict]] = {name: [] for name in controls}
        start = time.perf_counter()
        for i in range(args.runs):
            for name, factor in controls.items():
                t = time.perf_counter()
                result = one_run(job, factor)
                result["seconds"] = round(time.perf_counter() - t, 1)
                runs[name].append(result)
                print(f"{name:10s} run {i + 1}/{args.runs}: {result['verdict']:12s} by {result['decided_by']:22s} "
                      f"white-box {result['white_box_epsilon_lower_bound']:.3f} / ceiling {result['ceiling']:.3f}, "
                      f"noise <= {result['noise_multiplier_upper']:.3f} (sigma {result['noise_multiplier']:.3f}), "
                      f"black-box {result['canary_epsilon_lower_bound']:.3f}  [{result['seconds']} s]", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    first = next(iter(runs.values()))[0]
    result = {
        "q": first["sample_rate"], "steps": DEMO_STEPS, "canaries": args.canaries, "gradient_canaries": args.gradient_canaries,
        "records": args.records, "claimed_epsilon": first["claimed_epsilon"], "noise_multiplier": first["noise_multiplier"],
        "model": "1-layer BERT (hidden 256, random weights), LoRA r=8 on query/value, max_length 16",
        "controls": {
            name: {"runs": len(runs[name]), "fail": sum(r["verdict"] == "FAIL" for r in runs[name]),
                   **({"pass": sum(r["verdict"] == "PASS" for r in runs[name])} if name == "correct" else {}),
                   # how many an epsilon lower bound alone refutes (without the noise check)
                   "refuted_by_a_lower_bound": sum(max(r["white_box_epsilon_lower_bound"], r["canary_epsilon_lower_bound"])
                                                   > r["claimed_epsilon"] for r in runs[name]),
                   "decided_by": sorted({r["decided_by"] for r in runs[name]})}
            for name in controls
        },
        "targets": {"no_noise": "fail 10 of 10", "half_sigma": "fail at least 9 of 10", "correct": "pass 10 of 10"},
        "runs": runs,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": "python benchmarks/audit_power.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["controls"]))


if __name__ == "__main__":
    main()
