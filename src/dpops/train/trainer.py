"""DP fine-tuning (stage 5): Opacus DP-SGD with Poisson sampling, exactly the planned steps.

The trainer runs what the :class:`~dpops.privacy.plan.Plan` says and nothing else: it builds a Poisson
data loader with the plan's sample rate (and checks Opacus uses exactly that), a DP optimizer with
the plan's noise multiplier and clipping bound, and stops at the plan's steps. Noise is added on
every step, empty batches included. It never uses the HF ``Trainer`` (which does not clear Opacus
state between steps).

What trains is the job's ``method`` (see :func:`dpops.models.hf.build`); how per-example gradients
are clipped is its ``grad_sample_mode``, a registered clipping mode of
:mod:`dpops.train.private_step`, which also takes each noisy step, in physical pieces of at most
``training.max_physical_batch_size`` records. Under ``torch.distributed`` (torchrun, see
:mod:`dpops.train.distributed`), every process holds the same records (checked) and Poisson-samples its own
shard of them at the same rate, empty batches included; gradients are summed across processes and
only rank 0 adds noise (Opacus's DPDDP and distributed DP optimizers).

With unit of privacy 'user' (a ``user`` column in the data), users are Poisson-sampled and each
user's per-record gradients are summed into one contribution before clipping (:mod:`dpops.train.user_level`).
That needs the per-example gradients of the whole batch at once: mode ``hooks``, one process, no
physical pieces.

White-box audit (``audit.gradient_canaries``): :class:`dpops.train.canary_probe.GradientCanaryProbe`.
The optimizer is AdamW, with an optional learning-rate schedule and moving average of the weights
(:mod:`dpops.train.schedule`); both only post-process the noisy gradients.

What may train (:func:`authorize`, before anything else): DP-SGD under a ledger charge that is
``running`` and whose mechanism (dataset, sigma > 0, q, steps, C, n, unit, blocks) is exactly the
plan's, so the mechanism trained is the mechanism charged. Without a charge, or without noise (a
non-private baseline, a hyperparameter sweep), only a dataset whose config says ``public: true``.

What leaves the trainer (:class:`TrainResult`, the log lines): the DP weights and functions of them
(the saved model, its fingerprint), the plan's epsilon after each step, the learning rate, the
seconds taken and the machine it ran on, the mechanism that ran (sigma, q and C, read back from
the optimizer and the sampler), and the gradient canaries' observations (coordinates of the
released noisy sums: post-processing of the DP output). Never a statistic of a private batch: not
its loss (the training-loss curve is not released; a DP estimate of it, e.g. clipped per-example
losses plus Gaussian noise, would be a mechanism of its own that the ledger would have to charge,
which dpops does not do) and not its size (a Poisson batch's size is a noisy count of the private records).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from dpops.assess.canaries import GradientCanaries
from dpops.config.schema import DatasetConfig, JobConfig, TrainingSettings
from dpops.errors import ConfigError, PrivacyError
from dpops.ledger.states import RUNNING, Charge
from dpops.models import hf as modeling
from dpops.privacy import accounting
from dpops.privacy import plan as plans
from dpops.privacy.accounting import SubsampledGaussian
from dpops.privacy.plan import Plan
from dpops.train import canary_probe, private_step, schedule
from dpops.train import user_level as users

log = logging.getLogger("dpops.training")

#: File name, beside the model directory, of the gradient canaries' observations (float32 [steps, m]).
GRADIENT_OBSERVATIONS = "gradient_observations.npy"


@dataclass
class TrainResult:
    steps_run: int
    seconds: float
    epsilon_by_step: list[tuple[int, float]] = field(default_factory=list)
    trainable_parameters: int = 0
    total_parameters: int = 0
    grad_sample_mode: str = "hooks"
    device: str = "cpu"
    precision: str = "fp32"
    world_size: int = 1
    weights_sha256: Optional[str] = None
    model_dir: Optional[str] = None
    #: The mechanism that actually ran, read back from the DP optimizer (sigma, C) and the data
    #: loader's sampler (q) at the end of the run, not copied from the plan: the accountant's
    #: cross-check recomputes epsilon from these. None only in a result not made by :func:`train`.
    noise_multiplier: Optional[float] = None
    sample_rate: Optional[float] = None
    max_grad_norm: Optional[float] = None
    #: Path of the gradient canaries' observations (:data:`GRADIENT_OBSERVATIONS`, rank 0), None without them.
    gradient_observations: Optional[str] = None


# --------------------------------------------------------------------------- data and devices


def shard(n: int, *, rank: int, world: int) -> range:
    """The records process ``rank`` of ``world`` samples from: every ``world``-th, from ``rank``.

    The shards partition the records and depend only on n, never on their content.
    """
    return range(rank, n, world)


def _dp_loader(dataset: TensorDataset, plan: Plan, generator: torch.Generator, *, distributed: bool):
    """Poisson batches at the plan's q; under ``torch.distributed``, of this process's shard.

    Each process samples every record of its shard independently at q, empty batches included,
    so the union of the processes' batches is one Poisson sample of all records at q: the sampler
    the accountant assumes. (Opacus's ``DistributedUniformWithReplacementSampler`` is not used: it
    skips a process's empty batches, so each batch it yields is conditioned on being non-empty.)
    """
    from opacus.data_loader import DPDataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    if distributed:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if len(dataset) < world:
            raise ConfigError(f"field 'training.nproc_per_node': {world} processes for {len(dataset)} records")
        dataset = Subset(dataset, shard(len(dataset), rank=rank, world=world))
    loader = DPDataLoader(dataset, sample_rate=plan.sample_rate, generator=generator)
    sampler = loader.batch_sampler
    if not isinstance(sampler, UniformWithReplacementSampler) or sampler.sample_rate != plan.sample_rate:
        raise PrivacyError(
            f"the data loader samples with {type(sampler).__name__} at rate {getattr(sampler, 'sample_rate', None)}, "
            f"but the accountant assumes Poisson sampling at q = {plan.sample_rate}"
        )
    return loader


def _logical_batches(loader) -> Iterator[tuple[torch.Tensor, ...]]:
    """Poisson batches, epoch after epoch, for as long as asked."""
    while True:
        yield from loader


def resolve_device(settings: TrainingSettings, *, local_rank: int = 0) -> tuple[torch.device, Optional[torch.dtype]]:
    """The device to train on and the autocast dtype (None: fp32), from the job's training settings.

    Raises:
        ConfigError: a GPU or bf16 was asked for where there is none.
    """
    has_gpu = torch.cuda.is_available()
    if settings.device == "cuda" and not has_gpu:
        raise ConfigError("field 'training.device' is 'cuda' but no GPU is visible")
    device = torch.device(f"cuda:{local_rank}") if settings.device == "cuda" or (settings.device == "auto" and has_gpu) else torch.device("cpu")
    gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if settings.precision == "bf16" and device.type == "cuda" and not gpu_bf16:
        raise ConfigError("field 'training.precision' is 'bf16' but this GPU does not support bfloat16")
    bf16 = settings.precision == "bf16" or (settings.precision == "auto" and gpu_bf16)
    return device, (torch.bfloat16 if bf16 else None)


# --------------------------------------------------------------------------- what may train


def require_public(dataset: DatasetConfig, what: str) -> None:
    """Refuse ``what`` (computation no ledger charge covers) unless the dataset is declared public.

    Raises:
        PrivacyError: the dataset config does not set ``public: true``.
    """
    if not dataset.public:
        raise PrivacyError(
            f"dataset {dataset.name!r} is not public (dataset config field 'public' is false): {what} is refused on it. "
            "Private data is trained on only by DP-SGD under a running ledger charge (the pipeline's train stage); "
            "tune on a public proxy dataset, or as charged runs. Nothing was trained."
        )


def authorize(
    job: JobConfig, plan: Plan, dataset: DatasetConfig, charge: Optional[Charge], *, unit: str, delta: Optional[float] = None
) -> None:
    """Refuse a run the ledger did not admit as it would run; called before any training.

    With a ``charge`` (read from the ledger): it must be ``running`` (marked before the first
    private record was read) and its mechanism must equal the plan's in every figure the guarantee
    depends on (:func:`dpops.privacy.plan.charge_differences`; ``unit`` is the unit trained, 'user' when
    the records name users), with sigma > 0; with ``delta`` (the ledger's, for a caller that holds
    the ledger), the plan's delta too. Without one, only a public dataset (config field
    ``public``) may be trained on, then also without noise (sigma 0: a non-private baseline).

    Raises:
        PrivacyError: any of the above does not hold. The message names figures and fields only.
    """
    if plan.dataset != dataset.ledger_name or job.dataset != dataset.name:
        raise PrivacyError(f"the plan is for dataset {plan.dataset!r} and the job for {job.dataset!r}, but the dataset "
                           f"config is {dataset.name!r}. Nothing was trained.")
    sigma = plan.noise_multiplier
    if not (math.isfinite(sigma) and sigma >= 0):
        raise PrivacyError(f"noise multiplier {sigma!r}: must be a finite number >= 0. Nothing was trained.")
    if charge is None:
        require_public(dataset, "training without a running ledger charge" + (" and without noise" if sigma == 0 else ""))
        return
    if sigma == 0:
        raise PrivacyError(f"charge {charge.id}: noise multiplier 0 is not DP-SGD; a charge admits sigma > 0 only. "
                           "Nothing was trained.")
    if charge.state != RUNNING:
        raise PrivacyError(f"charge {charge.id} is {charge.state!r}, not 'running': the ledger must mark it running "
                           "(Ledger.start) before its data is read and trained on. Nothing was trained.")
    found = plans.charge_differences(plan, charge, unit=unit, delta=delta)
    if found:
        raise PrivacyError(f"the plan differs from what charge {charge.id} admitted: {'; '.join(found)}. The mechanism "
                           "trained must be the one charged. Nothing was trained.")


# --------------------------------------------------------------------------- the run


def train(
    job: JobConfig,
    plan: Plan,
    train_df: pd.DataFrame,
    *,
    dataset: DatasetConfig,
    labels: list[str],
    output_dir: Path,
    charge: Optional[Charge] = None,
    on_step: Optional[Callable[[int], None]] = None,
    log_every: int = 10,
    gradient_canaries: Optional[GradientCanaries] = None,
) -> TrainResult:
    """Run exactly ``plan.steps`` noisy steps of the job's method and save the trainable weights.

    Under ``torch.distributed`` every process calls this with the whole ``train_df``; each samples
    its own shard, and only rank 0 reports steps, logs and saves.

    Args:
        train_df: records with columns ``text`` and ``label`` (and ``user`` for unit 'user': then
            users are sampled and clipped, see :mod:`dpops.train.user_level`); at most ``plan.n_records``
            privacy units (the n delta was checked for; it counts every audit canary, of which
            about half are included). Sampling stays at ``plan.sample_rate`` whatever the count.
        dataset: the config of the dataset the records come from (its ``public`` flag decides
            whether a run without ``charge`` is allowed).
        charge: the run's ledger charge, read from the ledger once ``running``; its mechanism must
            be the plan's (:func:`authorize`). None only for a public dataset.
        on_step: called (rank 0) with each step's number, 1 for the first, before the step's
            batch is drawn: for durable progress recorded ahead of the steps taken
            (:func:`dpops.pipeline.stages.progress_recorder`). If it raises, that step is not taken.
        gradient_canaries: white-box Dirac canaries of the DP step (counted in ``plan.n_records``
            like the records' canaries): with any, each included one is sampled at every step and
            added to the clipped sum before noise, and rank 0 saves the observations
            (:class:`~dpops.train.canary_probe.GradientCanaryProbe`) at ``output_dir.parent /`` :data:`GRADIENT_OBSERVATIONS`.

    Raises:
        PrivacyError: the run is not authorized (:func:`authorize`), the data or the sampler
            differ from what the plan assumed, or the trainable weights did not move on the
            first step.
        ConfigError: the job asks for something this machine or model cannot do.
    """
    per_user = users.USER in train_df.columns
    authorize(job, plan, dataset, charge, unit="user" if per_user else "record")
    if users.units(train_df) > plan.n_records:
        raise PrivacyError(f"plan is for at most n = {plan.n_records} units but {users.units(train_df)} were loaded")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if per_user and (job.grad_sample_mode != "hooks" or distributed):
        raise ConfigError(
            "unit 'user' needs every per-example gradient of a batch in one process: field "
            f"'training.grad_sample_mode' must be 'hooks' (found {job.grad_sample_mode!r}) and training not distributed"
        )
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if distributed:
        _check_same_records(train_df)
    device, autocast_dtype = resolve_device(job.training, local_rank=_local_rank() if distributed else 0)
    torch.manual_seed(job.seed)  # model initialisation only
    # Sampling and noise draw fresh randomness every run, never from the job's seed, and the seed
    # is neither logged nor stored: two runs sharing noise on neighbouring data versions would let
    # the noise cancel out of the difference of their outputs, which no accountant covers.
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))

    base = modeling.base_model_path(job.model)
    tokenizer = modeling.load_tokenizer(base)
    net = modeling.build(job.task, job.method, base, n_labels=len(labels), lora=job.lora).to(device)
    ids, mask = modeling.encode(tokenizer, train_df["text"].tolist(), job.model.max_length)
    y = torch.tensor(train_df["label"].to_numpy(), dtype=torch.long)
    dataset = TensorDataset(ids, mask, y)
    if per_user:
        loader = users.UserBatches(dataset, train_df[users.USER], sample_rate=plan.sample_rate, generator=sampling)
    else:
        loader = _dp_loader(dataset, plan, sampling, distributed=distributed)

    params = [p for p in net.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=job.optim.learning_rate, weight_decay=job.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda done: schedule.learning_rate_factor(job.optim, done, plan.steps))
    average = schedule.WeightAverage(params, job.optim.ema_decay) if job.optim.ema_decay is not None else None
    private = private_step.make_private(
        net, inner, task=job.task, mode=job.grad_sample_mode, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size, generator=noise,
        distributed=distributed, autocast_dtype=autocast_dtype,
    )
    probe = None
    if gradient_canaries is not None and gradient_canaries.count > 0:
        probe = canary_probe.GradientCanaryProbe(gradient_canaries, rank=rank)
        probe.attach(private, params, plan, private_step.mechanism_ran(private, loader))
    result = TrainResult(
        steps_run=0, seconds=0.0, trainable_parameters=sum(p.numel() for p in params),
        total_parameters=sum(p.numel() for p in net.parameters()), grad_sample_mode=private.mode,
        device=device.type, precision="bf16" if autocast_dtype else "fp32", world_size=world,
    )
    start = time.perf_counter()
    before = [p.detach().clone() for p in params]
    batches = _logical_batches(loader)
    for step in range(1, plan.steps + 1):
        if on_step is not None and rank == 0:
            on_step(step)  # before the step: durable progress must never be below the steps taken
        lr = scheduler.get_last_lr()[0]  # this step's
        private_step.noisy_step(
            private, next(batches), device=device,
            max_physical=None if per_user else job.training.max_physical_batch_size,
            regroup=loader.merge_grad_samples if per_user else None,
        )
        scheduler.step()
        if average is not None:
            average.update(params)
        if step == 1:
            if all(torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)):
                raise PrivacyError("trainable weights did not change after the first step")
            del before
        result.steps_run = step
        if rank != 0:
            continue
        if step % log_every == 0 or step == plan.steps:
            eps = _epsilon_after(plan, step)
            result.epsilon_by_step.append((step, eps))
            log.info("step %d/%d  epsilon %.3f  lr %.2e  %.1fs", step, plan.steps, eps, lr, time.perf_counter() - start)
    result.seconds = time.perf_counter() - start
    ran = private_step.mechanism_ran(private, loader)
    result.noise_multiplier, result.sample_rate, result.max_grad_norm = ran.noise_multiplier, ran.sample_rate, ran.max_grad_norm
    if average is not None:
        average.copy_to(params)  # what is saved, scored and fingerprinted is the average
    result.weights_sha256 = _fingerprint(params)

    if rank == 0:
        net.eval()
        modeling.save(net, output_dir, model_cfg=job.model, lora=job.lora, labels=labels, task=job.task, method=job.method)
        result.model_dir = str(output_dir)
        if probe is not None:
            observations = canary_probe.save_observations(probe, output_dir.parent / GRADIENT_OBSERVATIONS, result.steps_run)
            result.gradient_observations = str(observations)
    return result


def _epsilon_after(plan: Plan, steps: int) -> float:
    """Run epsilon after ``steps`` steps; infinite without noise (a non-private baseline on a public
    dataset is never hidden)."""
    if plan.noise_multiplier == 0:
        return math.inf
    return accounting.epsilon([SubsampledGaussian(plan.noise_multiplier, plan.sample_rate, steps)], delta=plan.delta)


def _fingerprint(params: list[nn.Parameter]) -> str:
    """sha256 of the trained weights: identifies the result (and shows that distributed processes agree)."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _check_same_records(train_df: pd.DataFrame) -> None:
    """Every process must hold the same records: each samples its own shard of them, so a record
    held by two processes' different shards could be sampled twice in one step."""
    digest = hashlib.sha256()
    for column in train_df.columns:
        digest.update(column.encode())
        digest.update(pd.util.hash_pandas_object(train_df[column], index=True).to_numpy().tobytes())
    mine = (len(train_df), digest.hexdigest())
    everyone: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    if len(set(everyone)) != 1:
        raise PrivacyError(f"the training processes loaded different records ({sorted({n for n, _ in everyone})} records)")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
