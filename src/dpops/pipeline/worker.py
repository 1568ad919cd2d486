"""One process of a training group (torchrun starts it; see :mod:`dpops.train.distributed`).

The process reads the charge from the ledger itself and refuses a request whose plan is not the
running charge's mechanism (:func:`running_charge`) before it joins the group or reads a record;
then it reads its training records through the one-process stage's own function
(:func:`dpops.pipeline.stages.training_records`), trains (:func:`dpops.train.trainer.train`), and
rank 0 writes the result the parent accepts (:func:`dpops.train.distributed.train_processes`).
It crosses layers (ledger, data, train), so it lives in the pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch

from dpops.assess import canaries
from dpops.config.schema import DatasetConfig, JobConfig
from dpops.config.spec import RunSpec
from dpops.config.workspace import apply_quiet_env
from dpops.errors import PrivacyError
from dpops.ledger.states import Charge
from dpops.pipeline import stages
from dpops.privacy.plan import Plan
from dpops.train import trainer as training


def run_worker(request: dict[str, Any]) -> None:
    """One process of the group: read the records, train, and (rank 0) write the result."""
    spec = RunSpec.load(request["job_path"])
    job, ds = spec.job, spec.dataset
    plan = Plan(**request["plan"])
    charge = running_charge(request["charge_id"], job, plan, ds, spec=spec)  # before joining the group or reading a record
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device, _ = training.resolve_device(job.training, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        drawn = canaries.Canaries.load(Path(request["canaries_path"]))
        gradient_path = request.get("gradient_canaries_path")
        gradient = canaries.GradientCanaries.load(Path(gradient_path)) if gradient_path else None
        df = stages.training_records(job, ds, request["ref"], request["plan"], drawn,
                                     subset_key=bytes.fromhex(request["subset_key"]))
        ledger = stages._ledger() if rank == 0 else None  # rank 0 alone steps the optimizer's noise and reports
        try:
            on_step = stages.progress_recorder(ledger, request["charge_id"], total_steps=request["plan"]["steps"]) if ledger else None
            result = training.train(job, plan, df, dataset=ds, charge=charge, labels=list(ds.labels),
                                    output_dir=Path(request["output_dir"]), on_step=on_step, gradient_canaries=gradient)
        finally:
            if ledger is not None:
                ledger.dispose()
        del df
        mine = {"rank": rank, "steps_run": result.steps_run, "weights_sha256": result.weights_sha256,
                "saved": result.model_dir is not None}
        ranks: list[Optional[dict[str, Any]]] = [None] * world
        torch.distributed.all_gather_object(ranks, mine)
        if rank == 0:
            path = Path(request["result_path"])
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({**asdict(result), "charge_id": request["charge_id"], "ranks": ranks}))
            tmp.replace(path)
    finally:
        torch.distributed.destroy_process_group()


def running_charge(charge_id: str, job: JobConfig, plan: Plan, ds: DatasetConfig, *, spec: Optional[RunSpec] = None) -> Charge:
    """The request's charge as the ledger holds it, checked against the request's plan and, with
    ``spec``, against the configs it was reserved for (:func:`dpops.pipeline.stages.spec_difference`).

    The request file is only a reference: what a process trains must be what the ledger charged,
    so each process reads the charge itself and refuses (:func:`dpops.train.trainer.authorize`) a plan
    that differs from it, or a charge that is not running, before it reads a record. The charge
    is already running (the parent started it), so a refusal here leaves it charged in full: the
    parent sees the failed processes and marks it ``failed_charged``; the ledger cannot tell that
    nothing was read, and a charge never goes down on a process's word.

    Raises:
        PrivacyError: the plan is not the running charge's mechanism, or the configs changed.
    """
    ledger = stages._ledger()
    try:
        charge = ledger.charge(charge_id)
        delta = ledger.budget(charge.dataset).delta
    finally:
        ledger.dispose()
    why = stages.spec_difference(spec, charge) if spec is not None else None
    if why is not None:
        raise PrivacyError(f"{why}. This process read no record; the charge is running, so it stays charged in full")
    training.authorize(job, plan, ds, charge, unit=ds.unit, delta=delta)
    return charge


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of every training process (started by torchrun, never by hand)."""
    parser = argparse.ArgumentParser(prog="python -m dpops.pipeline.worker", description="One process of a dpops training group.")
    parser.add_argument("--request", type=Path, required=True, help="The request file the train stage wrote.")
    args = parser.parse_args(argv)
    apply_quiet_env()
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("dpops").setLevel(logging.INFO)
    run_worker(json.loads(args.request.read_text()))


if __name__ == "__main__":
    main()
