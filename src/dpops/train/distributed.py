"""Stage 5 in several processes: the train stage runs torchrun and settles from one result file.

With ``training.nproc_per_node`` N > 1, :func:`dpops.pipeline.stages.train` marks the charge ``running``,
draws the canaries, and calls :func:`train_processes`, which writes a request of references only
(the job file, the data reference, the plan, the charge id, the canaries files, the output
directory, the key choosing each user's kept records; never a record) beside the run and runs::

    python -m torch.distributed.run --standalone --nproc_per_node N --max-restarts 0 -m dpops.pipeline.worker --request FILE

Every process (:func:`dpops.pipeline.worker.main`) first reads the charge from the ledger and refuses a request whose
plan is not the running charge's mechanism (:func:`dpops.pipeline.worker.running_charge`), then joins the group (gloo
on CPU, nccl on GPU, from the job's device), reads the training records itself, fingerprint-checked,
through the same function as the one-process stage (:func:`dpops.pipeline.stages.training_records`), and calls :func:`dpops.train.trainer.train`, which
Poisson-samples each process's shard at the plan's q and adds noise on rank 0 only. Rank 0 alone
records the charge's progress in the ledger, before each chunk of steps
(:func:`dpops.pipeline.stages.progress_recorder`); the other ranks cannot finish a step without it. Rank 0 writes
the result: the :class:`~dpops.train.trainer.TrainResult` and, for every rank, its steps, weight
fingerprint and whether it saved. The parent accepts it only when torchrun exits 0 and every rank
ran exactly the planned steps, every fingerprint is the same and only rank 0 saved; anything
else raises, and the stage marks the charge ``failed_charged``: the data was read. Only an
accepted result becomes the charge's ``finished`` event (written by the stage), the steps settle
commits.

torchrun never restarts a process here (``--max-restarts 0``): a restarted group would train
again, with fresh noise, on data the charge already paid for once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from dpops.config.schema import JobConfig
from dpops.errors import ConfigError, PrivacyError, TrainingError
from dpops.train import trainer as training

log = logging.getLogger("dpops.launch")

#: The module torchrun starts in every process (tests point it at a worker that dies).
WORKER_MODULE = "dpops.pipeline.worker"
#: Files in ``<run dir>/launch/``: what the parent asks, and what rank 0 answers.
REQUEST, RESULT = "request.json", "result.json"
#: Seconds the processes get to stop after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 30.0


# --------------------------------------------------------------------------- the parent


def check_machine(job: JobConfig) -> None:
    """Refuse what this machine cannot run, before the charge starts.

    Raises:
        ConfigError: a GPU or bf16 asked for where there is none, or more GPU processes than GPUs.
    """
    device, _ = training.resolve_device(job.training)
    n = job.training.nproc_per_node
    if n > 1 and device.type == "cuda" and torch.cuda.device_count() < n:
        raise ConfigError(
            f"field 'training.nproc_per_node' is {n}, but {torch.cuda.device_count()} GPU(s) are visible "
            "(one process per GPU)"
        )


def command(request: Path, nproc: int) -> list[str]:
    """The torchrun command line: the venv's own torchrun, and references only."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "--max-restarts=0", "-m", WORKER_MODULE, "--request", str(request)]


def train_processes(
    *, job_path: str, ref: dict[str, Any], plan: dict[str, Any], charge_id: str, canaries_path: Path, run_dir: Path,
    nproc: int, subset_key: bytes, gradient_canaries_path: Optional[str] = None,
) -> dict[str, Any]:
    """Train in ``nproc`` processes (torchrun) and return rank 0's result, once checked.

    Call only once the charge is ``running``. ``gradient_canaries_path``: the run's
    :class:`~dpops.assess.canaries.GradientCanaries` file, if any; every process loads it (rank 0 adds the
    canaries, every rank observes them, rank 0 saves the observations beside ``run_dir / "model"``). Returns the fields of
    :class:`~dpops.train.trainer.TrainResult` plus ``ranks`` (per rank: steps run, weight fingerprint,
    whether it saved).

    Raises:
        TrainingError: torchrun exited non-zero (a process failed or was killed) or wrote no result.
        PrivacyError: a rank ran other than the planned steps, the ranks' weights differ, or a rank
            other than 0 saved.
    """
    work = run_dir / "launch"
    work.mkdir(parents=True, exist_ok=True)
    result_path = work / RESULT
    result_path.unlink(missing_ok=True)
    request = {
        "job_path": str(Path(job_path).resolve()), "ref": ref, "plan": plan, "charge_id": charge_id,
        "canaries_path": str(canaries_path), "output_dir": str(run_dir / "model"), "result_path": str(result_path),
        "subset_key": subset_key.hex(),  # every process keeps the same records of each user
        "gradient_canaries_path": None if gradient_canaries_path is None else str(gradient_canaries_path),
    }
    request_path = work / REQUEST
    request_path.write_text(json.dumps(request))
    # The processes import this very dpops, whatever the caller's sys.path.
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    log.info("charge %s: training in %d processes (torchrun)", charge_id, nproc)
    proc = subprocess.Popen(command(request_path, nproc), env=env, start_new_session=True)
    try:
        code = proc.wait()
    except BaseException:  # cancelled or interrupted: stop every process before the charge is failed
        _stop(proc)
        raise
    if code != 0:
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise TrainingError(f"charge {charge_id}: the training processes failed ({how}; see their log above)")
    return _accept(result_path, plan=plan, charge_id=charge_id, nproc=nproc)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_SECONDS), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _accept(result_path: Path, *, plan: dict[str, Any], charge_id: str, nproc: int) -> dict[str, Any]:
    try:
        out = json.loads(result_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise TrainingError(f"charge {charge_id}: the training processes exited 0 but wrote no result ({result_path})") from None
    if out.get("charge_id") != charge_id:
        raise TrainingError(f"charge {charge_id}: {result_path} is the result of charge {out.get('charge_id')!r}")
    ranks = out.get("ranks") or []
    if out.get("world_size") != nproc or sorted(r["rank"] for r in ranks) != list(range(nproc)):
        raise PrivacyError(f"charge {charge_id}: asked for {nproc} processes, the result reports {out.get('world_size')}")
    steps = sorted({r["steps_run"] for r in ranks})
    if steps != [plan["steps"]] or out["steps_run"] != plan["steps"]:
        raise PrivacyError(f"charge {charge_id}: the processes ran {steps} steps; the plan is exactly {plan['steps']}")
    if len({r["weights_sha256"] for r in ranks}) != 1:
        raise PrivacyError(f"charge {charge_id}: the processes' weights diverged (fingerprints differ)")
    saved = [r["rank"] for r in ranks if r["saved"]]
    if saved != [0] or not out.get("model_dir"):
        raise PrivacyError(f"charge {charge_id}: the model must be saved by rank 0 alone; saved by ranks {saved}")
    out.pop("charge_id")
    return out
