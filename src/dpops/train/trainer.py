"""DP fine-tuning (stage 5): Opacus DP-SGD with Poisson sampling, exactly the planned steps.

The trainer runs what the :class:`~dpops.privacy.plan.Plan` says and nothing else: it builds a Poisson
data loader with the plan's sample rate (and checks Opacus uses exactly that), a DP optimizer with
the plan's noise multiplier and clipping bound, and stops at the plan's steps. Noise is added on
every step, empty batches included. It never uses the HF ``Trainer`` (which does not clear Opacus
state between steps).

What trains is the job's ``method`` (see :func:`dpops.model.apply_method`); how per-example
gradients are clipped is its ``grad_sample_mode``:

* ``hooks``: Opacus computes every per-example gradient (``p.grad_sample``), then clips and sums.
  Cheap when few weights train (LoRA, head, BitFiT).
* ``ghost``: ghost clipping computes per-example gradient *norms* without materialising
  per-example gradients, then a second backward pass sums the clipped gradients.
* ``bk``: book-keeping (:mod:`dpops.train.bookkeeping`): the same norms and the clipped sum from one
  backward pass. The choice for full fine-tuning, where a per-example copy of every weight would
  not fit and a second backward pass would cost nearly as much as the first.

A Poisson batch larger than ``training.max_physical_batch_size`` is processed in pieces (its
records ordered by length, so each piece is padded only to its own longest text): each piece is
clipped and summed into the same step (Opacus's ``signal_skip_step``, the protocol of its
``BatchMemoryManager``), and one noisy step is taken per logical batch, so the sample rate and the
step count the accountant assumes are unchanged. Under ``torch.distributed`` (torchrun, see
:mod:`dpops.train.distributed`), every process holds the same records (checked) and Poisson-samples its own
shard of them at the same rate, empty batches included; gradients are summed across processes and
only rank 0 adds noise (Opacus's DPDDP and distributed DP optimizers).

With unit of privacy 'user' (a ``user`` column in the data), users are Poisson-sampled and each
user's per-record gradients are summed into one contribution before clipping (:mod:`dpops.users`).
That needs the per-example gradients of the whole batch at once: mode ``hooks``, one process, no
physical pieces.

White-box audit (``audit.gradient_canaries``, :class:`GradientCanaryProbe`): Dirac canary
gradients of norm exactly C, each Poisson-sampled at q like a record, are added to the clipped sum
before noise, and each step's released noisy sum is read at their coordinates.

The optimizer is AdamW, with an optional learning-rate schedule over the planned steps and an
optional moving average of the weights (``optim``); both only post-process the noisy gradients.

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

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from dpops.assess.canaries import GradientCanaries, gradient_coordinates
from dpops.config.schema import DatasetConfig, JobConfig, OptimSettings, TrainingSettings
from dpops.errors import ConfigError, PrivacyError, TrainingError
from dpops.ledger.states import RUNNING, Charge
from dpops.models import hf as modeling
from dpops.privacy import accounting
from dpops.privacy import plan as plans
from dpops.privacy.accounting import SubsampledGaussian
from dpops.privacy.plan import Plan
from dpops.train import bookkeeping
from dpops.train import user_level as users

log = logging.getLogger("dpops.training")

# Modes whose backward pass leaves the clipped per-example sum in p.grad (Opacus's fast-gradient-clipping optimizers)
CLIPPED_IN_BACKWARD = ("ghost", bookkeeping.MODE)
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


# --------------------------------------------------------------------------- the private model


@dataclass
class PrivateModel:
    """A model made private: Opacus's per-example wrapper, its DP optimizer, and the backward pass they need.

    ``module`` is Opacus's per-example-gradient wrapper (around DPDDP when distributed), which the
    forward pass calls; ``params`` are the trainable weights.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    task: str
    mode: str
    autocast_dtype: Optional[torch.dtype] = None

    def backward(self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
        """Forward and backward over one physical batch (its loss is not returned: a raw statistic
        of private records).

        Afterwards, in mode ``hooks``, every trainable ``p.grad_sample`` holds the per-example
        gradients [batch, *p.shape]; in modes ``ghost`` and ``bk``, ``p.grad`` holds the sum of
        the clipped per-example gradients. ``optimizer.step()`` then clips (hooks), sums and adds noise.
        """
        if len(y) == 0:
            self._empty_batch()
            return
        inputs = modeling.model_inputs(ids, mask)
        device_type = ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            outputs = self.module(*inputs)
            losses = modeling.per_example_loss(self.task, outputs, y, inputs[0], inputs[1]).float()
        if self.mode == "ghost":
            from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

            DPTensorFastGradientClipping(self.module, self.optimizer, losses, loss_reduction="mean").backward()
        elif self.mode == bookkeeping.MODE:
            self.module.backward(losses)
        else:
            losses.mean().backward()

    def _empty_batch(self) -> None:
        """An empty Poisson batch is still a step of the mechanism: a zero sum, to which noise is added."""
        for p in self.params:
            if self.mode in CLIPPED_IN_BACKWARD:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def make_private(
    net: nn.Module,
    inner: torch.optim.Optimizer,
    *,
    task: str,
    mode: str,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: float,
    generator: Optional[torch.Generator] = None,
    distributed: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
) -> PrivateModel:
    """Wrap ``net`` and ``inner`` (an optimizer over the trainable weights of ``net``) for DP-SGD.

    ``expected_batch_size`` is the whole logical batch (q * n); under ``torch.distributed`` each
    process averages over its share of it.

    Raises:
        ConfigError: ghost clipping was asked for a model with tied trainable weights (ghost
            clipping computes norms per layer and would misjudge a weight two layers share).
    """
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import (
        DistributedDPOptimizer,
        DistributedDPOptimizerFastGradientClipping,
        DPOptimizer,
        DPOptimizerFastGradientClipping,
    )

    tied = modeling.tied_trainable(net) if mode == "ghost" else []  # (bk checks its own, see below)
    if tied:
        raise ConfigError(f"field 'training.grad_sample_mode': 'ghost' cannot clip tied weights ({tied[:2]}); use 'hooks'")
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()  # Opacus records activations in training mode only (from_pretrained returns eval mode)
    world = torch.distributed.get_world_size() if distributed else 1
    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        net = DPDDP(net)  # broadcasts rank 0's weights; gradients are summed by the optimizer
    if mode in CLIPPED_IN_BACKWARD:  # p.grad arrives clipped and summed: the optimizer only adds noise
        if mode == "ghost":
            module = GradSampleModuleFastGradientClipping(net, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm)
        else:
            module = bookkeeping.BookKeeping(net, max_grad_norm=max_grad_norm)  # refuses what it cannot clip
        optimizer_class = DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
    else:
        module = GradSampleModule(net, batch_first=True, loss_reduction="mean", strict=True)
        module.forbid_grad_accumulation()  # two backward passes without a step would double-count examples
        optimizer_class = DistributedDPOptimizer if distributed else DPOptimizer
    optimizer = optimizer_class(
        inner,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size / world,
        loss_reduction="mean",
        generator=generator,
    )
    return PrivateModel(module=module, optimizer=optimizer, params=params, task=task, mode=mode, autocast_dtype=autocast_dtype)


# --------------------------------------------------------------------------- the mechanism that ran


@dataclass(frozen=True)
class Mechanism:
    """The subsampled Gaussian mechanism a private model and its loader run, read from them.

    ``max_grad_norm`` is the bound each unit's gradient is clipped to (in modes ``ghost`` and
    ``bk`` the module clips; in ``hooks`` the optimizer); ``noise_multiplier`` is the noise's
    standard deviation over that bound; ``sample_rate`` is the Poisson rate of the loader's sampler.
    """

    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float


def mechanism_ran(private: PrivateModel, loader) -> Mechanism:
    """What ``private`` and ``loader`` actually do, not what they were asked to do.

    The noise's standard deviation is the optimizer's (Opacus's fast-clipping optimizers use an
    ``_adjusted_noise_multiplier`` where one is set); the clipping bound is the module's where it
    clips (ghost, bk). When the two bounds agree, as :func:`make_private` builds them, the
    optimizer's noise multiplier is reported as it is (no rounding through std / C).
    """
    optimizer = private.optimizer
    sigma = float(getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier))
    noise_bound = float(optimizer.max_grad_norm)
    clip = float(getattr(private.module, "max_grad_norm", noise_bound)) if private.mode in CLIPPED_IN_BACKWARD else noise_bound
    if clip != noise_bound:
        sigma = sigma * noise_bound / clip
    return Mechanism(noise_multiplier=sigma, sample_rate=_sample_rate(loader), max_grad_norm=clip)


def _sample_rate(loader) -> float:
    """The Poisson rate of a record loader's sampler, or of :class:`dpops.users.UserBatches`'s."""
    if isinstance(loader, users.UserBatches):
        return loader.sample_rate
    return float(loader.batch_sampler.sample_rate)


# --------------------------------------------------------------------------- white-box gradient canaries


class GradientCanaryProbe:
    """Adds the included Dirac gradient canaries to each DP step and observes the released noisy sums.

    Injection (:meth:`attach` wraps the DP optimizer's ``add_noise``): Opacus calls ``add_noise``
    exactly once per logical step, once the clipped gradients of every physical piece are summed
    in ``p.summed_grad``; on a piece that ``signal_skip_step`` skips, ``pre_step`` returns before
    it. This holds for the four DP optimizers :func:`make_private` builds (``DPOptimizer``,
    ``DPOptimizerFastGradientClipping`` and their ``Distributed`` versions, which add noise on
    rank 0 and pass the sum on unchanged elsewhere). Just before the noise, each included canary is
    Poisson-sampled with the loader's rate q (fresh randomness, never the job's seed) and, when
    sampled, adds exactly the clipping bound C at its coordinate of ``summed_grad``: on rank 0
    only, so the all-reduced sum holds it once. A canary is thus one more unit of privacy of norm
    exactly C, sampled like a record (:class:`dpops.assess.canaries.GradientCanaries` says why that
    leaves the real records' guarantee unchanged).

    Observation (a step pre-hook on the inner torch optimizer): after the noise, Opacus's division
    by the expected batch size and, distributed, the all-reduce, every rank sees the final
    ``p.grad`` just before the weights move. Row t of :meth:`observations` holds, for each canary,
    its coordinate of step t's released noisy sum in units of the plan's C:
    ``p.grad[k] * expected_batch_size / C``. Without noise, an included canary sampled at step t
    shifts it by exactly 1; an excluded canary never shifts it.
    """

    def __init__(self, canaries: GradientCanaries, *, rank: int = 0):
        self.canaries = canaries
        self.rank = rank
        self.injections = 0  # calls of add_noise seen: one per logical step
        self._rng = np.random.default_rng(secrets.randbits(128))  # fresh: never the job's seed
        self._included = np.asarray(canaries.included, dtype=bool)
        self._rows: list[np.ndarray] = []
        self._slots: list[tuple[nn.Parameter, torch.Tensor, np.ndarray]] = []

    def attach(self, private: PrivateModel, params: list[nn.Parameter], plan: Plan, ran: Mechanism) -> None:
        """Hook into ``private`` (built over ``params``, the trainable weights in order).

        Canaries are sampled at ``ran.sample_rate`` and add ``ran.max_grad_norm``: the rate and
        bound the records actually get (equal to the plan's when the run is what was charged;
        where they are not, a canary still meets the mechanism as a record does, so the audit sees
        the difference). Observations are in units of the plan's C and expected batch size.
        """
        self._q, self._bound = ran.sample_rate, ran.max_grad_norm
        self._scale = plan.expected_batch_size / plan.max_grad_norm
        self._slots = self._coordinates(params)
        optimizer = private.optimizer
        add_noise = optimizer.add_noise

        def add_noise_with_canaries() -> None:
            self.injections += 1
            if self.rank == 0:
                self._inject()
            add_noise()

        optimizer.add_noise = add_noise_with_canaries
        optimizer.original_optimizer.register_step_pre_hook(lambda _optimizer, _args, _kwargs: self._observe())

    def observations(self) -> np.ndarray:
        """float32 [steps, m]: each step's released noisy sum at each canary's coordinate, in units of C."""
        if not self._rows:
            return np.zeros((0, self.canaries.count), dtype=np.float32)
        return np.stack(self._rows)

    def _coordinates(self, params: list[nn.Parameter]) -> list[tuple[nn.Parameter, torch.Tensor, np.ndarray]]:
        """Per parameter holding canaries: (parameter, flat indices into it, the canaries' columns)."""
        offsets = np.cumsum([0, *(p.numel() for p in params)])
        flat = gradient_coordinates(int(offsets[-1]), self.canaries.count, self.canaries.seed)
        owner = np.searchsorted(offsets, flat, side="right") - 1
        slots = []
        for i in np.unique(owner):
            columns = np.flatnonzero(owner == i)
            local = torch.as_tensor(flat[columns] - offsets[i], dtype=torch.long, device=params[i].device)
            slots.append((params[i], local, columns))
        return slots

    @torch.no_grad()
    def _inject(self) -> None:
        """Add C at the coordinate of every included canary sampled at this step (0 at the others)."""
        sampled = self._included & (self._rng.random(self.canaries.count) < self._q)
        for p, local, columns in self._slots:
            added = torch.as_tensor(sampled[columns] * self._bound, dtype=p.summed_grad.dtype, device=p.summed_grad.device)
            p.summed_grad.view(-1).index_add_(0, local, added)  # canaries sharing a coordinate each add C

    @torch.no_grad()
    def _observe(self) -> None:
        row = np.empty(self.canaries.count, dtype=np.float64)
        for p, local, columns in self._slots:
            row[columns] = p.grad.reshape(-1)[local].double().cpu().numpy()
        self._rows.append((row * self._scale).astype(np.float32))


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


def _pieces(batch: tuple[torch.Tensor, ...], max_size: Optional[int]) -> list[tuple[torch.Tensor, ...]]:
    """Split a logical batch (ids, mask, labels) into physical pieces of at most ``max_size`` records.

    The records are first ordered by length, so that each piece is padded only to its own longest
    text (:func:`dpops.models.hf.model_inputs` trims it). The step sums the clipped per-example
    gradients of all pieces, which does not depend on the order, and the batch itself (which
    records, how many) is the Poisson sample unchanged. On SST-2 (texts of 13 tokens on average,
    padded to 32) pieces of 64 carry about 1.1 tokens per real token instead of 2.5.
    An empty batch is one piece.
    """
    if max_size is None or len(batch[0]) <= max_size:
        return [batch]
    order = torch.argsort(batch[1].sum(dim=1), stable=True)
    return list(zip(*(t[order].split(max_size) for t in batch), strict=True))


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
            (:class:`GradientCanaryProbe`) at ``output_dir.parent /`` :data:`GRADIENT_OBSERVATIONS`.

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
    schedule = torch.optim.lr_scheduler.LambdaLR(inner, lambda done: learning_rate_factor(job.optim, done, plan.steps))
    average = WeightAverage(params, job.optim.ema_decay) if job.optim.ema_decay is not None else None
    private = make_private(
        net, inner, task=job.task, mode=job.grad_sample_mode, noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm, expected_batch_size=plan.expected_batch_size, generator=noise,
        distributed=distributed, autocast_dtype=autocast_dtype,
    )
    probe = None
    if gradient_canaries is not None and gradient_canaries.count > 0:
        probe = GradientCanaryProbe(gradient_canaries, rank=rank)
        probe.attach(private, params, plan, mechanism_ran(private, loader))
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
        lr = schedule.get_last_lr()[0]  # this step's
        _private_step(
            private, next(batches), device=device,
            max_physical=None if per_user else job.training.max_physical_batch_size,
            regroup=loader.merge_grad_samples if per_user else None,
        )
        schedule.step()
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
    ran = mechanism_ran(private, loader)
    result.noise_multiplier, result.sample_rate, result.max_grad_norm = ran.noise_multiplier, ran.sample_rate, ran.max_grad_norm
    if average is not None:
        average.copy_to(params)  # what is saved, scored and fingerprinted is the average
    result.weights_sha256 = _fingerprint(params)

    if rank == 0:
        net.eval()
        modeling.save(net, output_dir, model_cfg=job.model, lora=job.lora, labels=labels, task=job.task, method=job.method)
        result.model_dir = str(output_dir)
        if probe is not None:
            result.gradient_observations = str(_save_observations(probe, output_dir.parent / GRADIENT_OBSERVATIONS, result.steps_run))
    return result


def _save_observations(probe: GradientCanaryProbe, path: Path, steps: int) -> Path:
    """Save the probe's observations (one row per step taken, checked) as float32 .npy."""
    observed = probe.observations()
    if observed.shape[0] != steps or probe.injections != steps:
        raise TrainingError(f"gradient canaries: {probe.injections} injections and {observed.shape[0]} observations "
                           f"for {steps} steps")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, observed)
    return path


def _private_step(
    private: PrivateModel,
    batch: tuple[torch.Tensor, ...],
    *,
    device: torch.device,
    max_physical: Optional[int],
    regroup: Optional[Callable[[list[nn.Parameter]], None]] = None,
) -> None:
    """One noisy step on one Poisson batch, in physical pieces. Returns nothing: the batch's loss
    and size are raw statistics of private records.

    ``regroup`` (unit 'user') turns the per-record ``p.grad_sample`` rows into one row per user
    before the optimizer clips them.
    """
    optimizer = private.optimizer
    pieces = _pieces(batch, max_physical)
    for i, piece in enumerate(pieces):
        ids, mask, y = (t.to(device) for t in piece)
        private.backward(ids, mask, y)
        # Here (mode hooks) each trainable p.grad_sample holds this piece's per-example gradients:
        # the one place to regroup them (per user) before the optimizer clips them.
        if regroup is not None:
            regroup(private.params)
        optimizer.signal_skip_step(do_skip=i < len(pieces) - 1)  # clip and sum now, step after the last piece
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def learning_rate_factor(optim: OptimSettings, done: int, steps: int) -> float:
    """The fraction of the peak learning rate for the step after ``done`` steps, of ``steps`` in all.

    Warm-up rises linearly to the peak over ``optim.warmup_steps`` steps (the first step already
    moves: 1 / warmup of the peak); 'linear' and 'cosine' then decay towards 0, reaching
    1 / (steps - warmup) of the peak (linear) on the last step, never 0, so every step that is
    charged for also moves the weights.
    """
    warmup = optim.warmup_steps
    if done < warmup:
        return (done + 1) / warmup
    if optim.schedule == "constant":
        return 1.0
    progress = (done - warmup) / max(1, steps - warmup)  # 0 on the first step after warm-up, < 1 on the last
    if optim.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightAverage:
    """Exponential moving average of the trainable weights (Polyak averaging, as in De et al. 2022).

    The average is a function of the noisy iterates only, so it costs no privacy. The decay ramps up
    as ``min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so that the initial weights are
    forgotten quickly in short runs.
    """

    def __init__(self, params: list[nn.Parameter], decay: float):
        self.decay = decay
        self.updates = 0
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[nn.Parameter]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, p in zip(self.average, params, strict=True):
            avg.lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: list[nn.Parameter]) -> None:
        for avg, p in zip(self.average, params, strict=True):
            p.copy_(avg)


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
