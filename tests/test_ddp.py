"""Training beyond one process: two gloo processes on CPU, Opacus DPDDP and its distributed DP optimizer.

Each process Poisson-samples its own shard; gradients are summed across processes and only rank 0
adds noise, so after every step both processes must hold the same weights, and only rank 0
reports steps and saves the model.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pandas as pd
import pytest
import torch

from dpops.config.schema import JobConfig
from dpops.privacy.plan import Plan
from dpops.train import trainer as training
from tests.helpers import public_dataset
from tests.tiny_models import tiny_bert

TEXTS = ["a fine film", "dull and slow", "yes", "the cast is superb", "no", "an odd little thing", "sharp", "too long"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, base: str, out: str, mode: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        df = pd.DataFrame({"text": TEXTS * 4, "label": [1, 0, 1, 1, 0, 1, 1, 0] * 4})
        job = JobConfig(name="j", dataset="d", registered_model="m", method="full", model={"path": base},
                        dp={"target_epsilon": 8}, training={"grad_sample_mode": mode, "max_physical_batch_size": 3})
        plan = Plan(dataset="d", n_records=len(df), sample_rate=0.25, expected_batch_size=8.0, steps=3, noise_multiplier=1.0,
                    max_grad_norm=1.0, delta=1e-3, target_epsilon=8.0, epsilon=8.0)
        steps = []
        result = training.train(job, plan, df, dataset=public_dataset(), labels=["0", "1"], output_dir=Path(out) / "model", on_step=steps.append)
        summary = {"steps_run": result.steps_run, "world_size": result.world_size, "on_step": steps,
                   "model_dir": result.model_dir, "weights_sha256": result.weights_sha256}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(summary))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hooks", "ghost", "bk"])
def test_two_processes_take_the_same_private_steps(tmp_path, mode):
    base = tiny_bert(tmp_path / "bert")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(base), str(tmp_path), mode), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps_run"] == r1["steps_run"] == 3 and r0["world_size"] == r1["world_size"] == 2
    assert r0["on_step"] == [1, 2, 3] and r1["on_step"] == [], "only rank 0 reports progress to the ledger"
    assert r0["model_dir"] and r1["model_dir"] is None, "only rank 0 saves"
    assert r0["weights_sha256"] == r1["weights_sha256"], "the processes' weights diverged"


def test_each_process_poisson_samples_its_shard_empty_batches_included(tmp_path):
    """A process's batch is Poisson at q even when it comes out empty: one batch per step, never skipped.

    (Opacus's DistributedUniformWithReplacementSampler skips empty local batches, which conditions
    every batch on being non-empty and raises each record's inclusion probability above q.)
    """
    from torch.utils.data import TensorDataset

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        plan = Plan(dataset="d", n_records=4, sample_rate=0.05, expected_batch_size=0.2, steps=20, noise_multiplier=1.0,
                    max_grad_norm=1.0, delta=1e-3, target_epsilon=8.0, epsilon=8.0)
        loader = training._dp_loader(TensorDataset(torch.arange(4)), plan, torch.Generator().manual_seed(0), distributed=True)
        sizes = [len(batch[0]) for batch in loader]
    finally:
        torch.distributed.destroy_process_group()
    assert len(sizes) == 20 and sizes.count(0) > 10, sizes


@pytest.mark.parametrize("n,world", [(10, 2), (7, 3), (3, 3)])
def test_the_shards_partition_the_records(n, world):
    shards = [list(training.shard(n, rank=r, world=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
