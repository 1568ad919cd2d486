"""The private step: a model made private by Opacus, one registered clipping mode per ``training.grad_sample_mode``.

How per-example gradients are clipped is the job's ``grad_sample_mode``, one entry of the
registry below (:data:`CLIPPING_MODES`), each a function decorated with
:func:`register_clipping_mode` (as Opacus registers its grad samplers with
``register_grad_sampler``):

* ``hooks``: Opacus computes every per-example gradient (``p.grad_sample``), then clips and sums.
  Cheap when few weights train (LoRA, head, BitFiT).
* ``ghost``: ghost clipping computes per-example gradient *norms* without materialising
  per-example gradients, then a second backward pass sums the clipped gradients.
* ``bk``: book-keeping (:mod:`dpops.train.bookkeeping`): the same norms and the clipped sum from one
  backward pass. The choice for full fine-tuning, where a per-example copy of every weight would
  not fit and a second backward pass would cost nearly as much as the first.

A mode's entry says what the rest of the code needs to know of it: whether its backward pass
leaves the clipped per-example sum in ``p.grad`` (:data:`CLIPPED_IN_BACKWARD`: then the optimizer
only adds noise), whether it refuses tied trainable weights, and which layers it can clip
(checked again before anything is charged, :mod:`dpops.train.clipping`).

A Poisson batch larger than ``training.max_physical_batch_size`` is processed in pieces
(:func:`noisy_step`, its records ordered by length, so each piece is padded only to its own
longest text): each piece is clipped and summed into the same step (Opacus's
``signal_skip_step``, the protocol of its ``BatchMemoryManager``), and one noisy step is taken per
logical batch, so the sample rate and the step count the accountant assumes are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from dpops.errors import ConfigError
from dpops.models import hf as modeling
from dpops.train import bookkeeping
from dpops.train import user_level as users

# --------------------------------------------------------------------------- the clipping modes


@dataclass(frozen=True)
class ClippingMode:
    """One value of ``training.grad_sample_mode``: how :func:`make_private` wraps the model for it.

    ``wrap(net, max_grad_norm=C)`` returns the per-example wrapper the forward pass calls;
    ``backward(module, optimizer, losses)`` runs the backward pass over a physical batch's
    per-example losses. ``clips_in_backward``: the backward pass leaves the sum of the clipped
    per-example gradients in ``p.grad`` (Opacus's fast-gradient-clipping optimizers only add noise);
    otherwise every ``p.grad_sample`` holds the per-example gradients, which the optimizer clips.
    ``refuses_tied_weights``: the mode clips per layer and would misjudge a weight two layers
    share. ``check_layers`` (None: any layer) refuses, on a model or its skeleton, a trainable layer
    the mode has no rule for.
    """

    name: str
    wrap: Callable[..., nn.Module]
    backward: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None]
    clips_in_backward: bool
    refuses_tied_weights: bool = False
    check_layers: Optional[Callable[[nn.Module], Any]] = None


#: Every clipping mode, by its ``training.grad_sample_mode`` name (filled by :func:`register_clipping_mode`).
CLIPPING_MODES: dict[str, ClippingMode] = {}


def _mean_backward(module: nn.Module, optimizer: torch.optim.Optimizer, losses: torch.Tensor) -> None:
    losses.mean().backward()


def register_clipping_mode(
    name: str,
    *,
    clips_in_backward: bool,
    refuses_tied_weights: bool = False,
    backward: Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor], None] = _mean_backward,
    check_layers: Optional[Callable[[nn.Module], Any]] = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the decorated function as the ``wrap`` of clipping mode ``name`` (see :class:`ClippingMode`).

    >>> @register_clipping_mode("hooks", clips_in_backward=False)
    ... def wrap(net, *, max_grad_norm): ...
    Traceback (most recent call last):
    ...
    ValueError: clipping mode 'hooks' is registered already

    Raises:
        ValueError: ``name`` is registered already (a mode has one definition).
    """

    def decorator(wrap: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in CLIPPING_MODES:
            raise ValueError(f"clipping mode {name!r} is registered already")
        CLIPPING_MODES[name] = ClippingMode(
            name=name, wrap=wrap, backward=backward, clips_in_backward=clips_in_backward,
            refuses_tied_weights=refuses_tied_weights, check_layers=check_layers,
        )
        return wrap

    return decorator


def clipping_mode(name: str) -> ClippingMode:
    """The registered clipping mode ``name``.

    Raises:
        ConfigError: no mode of that name, naming the field 'training.grad_sample_mode'.
    """
    try:
        return CLIPPING_MODES[name]
    except KeyError:
        raise ConfigError(
            f"field 'training.grad_sample_mode': {name!r} is not a clipping mode; one of {sorted(CLIPPING_MODES)}"
        ) from None


@register_clipping_mode("hooks", clips_in_backward=False)
def _hooks(net: nn.Module, *, max_grad_norm: float) -> nn.Module:
    """Opacus's per-example gradients; its optimizer clips them."""
    from opacus import GradSampleModule

    module = GradSampleModule(net, batch_first=True, loss_reduction="mean", strict=True)
    module.forbid_grad_accumulation()  # two backward passes without a step would double-count examples
    return module


def _ghost_backward(module: nn.Module, optimizer: torch.optim.Optimizer, losses: torch.Tensor) -> None:
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    DPTensorFastGradientClipping(module, optimizer, losses, loss_reduction="mean").backward()


@register_clipping_mode("ghost", clips_in_backward=True, refuses_tied_weights=True, backward=_ghost_backward)
def _ghost(net: nn.Module, *, max_grad_norm: float) -> nn.Module:
    """Opacus's ghost clipping: per-example norms, then a second backward pass for the clipped sum."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    return GradSampleModuleFastGradientClipping(net, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm)


def _bookkeeping_backward(module: nn.Module, optimizer: torch.optim.Optimizer, losses: torch.Tensor) -> None:
    module.backward(losses)


@register_clipping_mode(
    bookkeeping.MODE, clips_in_backward=True, refuses_tied_weights=True, backward=_bookkeeping_backward,
    check_layers=bookkeeping.check,
)
def _bk(net: nn.Module, *, max_grad_norm: float) -> nn.Module:
    """Book-keeping: the norms and the clipped sum in one backward pass."""
    return bookkeeping.BookKeeping(net, max_grad_norm=max_grad_norm)  # refuses what it cannot clip


#: Modes whose backward pass leaves the clipped per-example sum in p.grad (Opacus's fast-gradient-clipping optimizers).
CLIPPED_IN_BACKWARD = tuple(name for name, mode in CLIPPING_MODES.items() if mode.clips_in_backward)


def _optimizer_class(mode: ClippingMode, *, distributed: bool) -> type:
    """Opacus's DP optimizer for ``mode`` (as Opacus's ``get_optimizer_class``, flat clipping)."""
    from opacus.optimizers import (
        DistributedDPOptimizer,
        DistributedDPOptimizerFastGradientClipping,
        DPOptimizer,
        DPOptimizerFastGradientClipping,
    )

    if mode.clips_in_backward:  # p.grad arrives clipped and summed: the optimizer only adds noise
        return DistributedDPOptimizerFastGradientClipping if distributed else DPOptimizerFastGradientClipping
    return DistributedDPOptimizer if distributed else DPOptimizer


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

    @property
    def clipping(self) -> ClippingMode:
        return clipping_mode(self.mode)

    def backward(self, ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor) -> None:
        """Forward and backward over one physical batch (its loss is not returned: a raw statistic
        of private records).

        Afterwards, in mode ``hooks``, every trainable ``p.grad_sample`` holds the per-example
        gradients [batch, *p.shape]; in modes ``ghost`` and ``bk`` (:data:`CLIPPED_IN_BACKWARD`),
        ``p.grad`` holds the sum of the clipped per-example gradients. ``optimizer.step()`` then
        clips (hooks), sums and adds noise.
        """
        if len(y) == 0:
            self._empty_batch()
            return
        inputs = modeling.model_inputs(ids, mask)
        device_type = ids.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            outputs = self.module(*inputs)
            losses = modeling.per_example_loss(self.task, outputs, y, inputs[0], inputs[1]).float()
        self.clipping.backward(self.module, self.optimizer, losses)

    def _empty_batch(self) -> None:
        """An empty Poisson batch is still a step of the mechanism: a zero sum, to which noise is added."""
        clipped = self.clipping.clips_in_backward
        for p in self.params:
            if clipped:
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
        ConfigError: ``mode`` is not a registered clipping mode, or it clips per layer and the
            model has tied trainable weights (it would misjudge a weight two layers share), or
            (``bk``) a trainable layer it cannot clip.
    """
    clipping = clipping_mode(mode)
    tied = modeling.tied_trainable(net) if clipping.refuses_tied_weights else []
    if tied:
        raise ConfigError(f"field 'training.grad_sample_mode': {mode!r} cannot clip tied weights ({tied[:2]}); use 'hooks'")
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()  # Opacus records activations in training mode only (from_pretrained returns eval mode)
    world = torch.distributed.get_world_size() if distributed else 1
    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        net = DPDDP(net)  # broadcasts rank 0's weights; gradients are summed by the optimizer
    module = clipping.wrap(net, max_grad_norm=max_grad_norm)
    optimizer = _optimizer_class(clipping, distributed=distributed)(
        inner,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size / world,
        loss_reduction="mean",
        generator=generator,
    )
    return PrivateModel(module=module, optimizer=optimizer, params=params, task=task, mode=mode, autocast_dtype=autocast_dtype)


# --------------------------------------------------------------------------- one noisy step


def noisy_step(
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
    parts = pieces(batch, max_physical)
    for i, piece in enumerate(parts):
        ids, mask, y = (t.to(device) for t in piece)
        private.backward(ids, mask, y)
        # Here (mode hooks) each trainable p.grad_sample holds this piece's per-example gradients:
        # the one place to regroup them (per user) before the optimizer clips them.
        if regroup is not None:
            regroup(private.params)
        optimizer.signal_skip_step(do_skip=i < len(parts) - 1)  # clip and sum now, step after the last piece
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def pieces(batch: tuple[torch.Tensor, ...], max_size: Optional[int]) -> list[tuple[torch.Tensor, ...]]:
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
    clip = float(getattr(private.module, "max_grad_norm", noise_bound)) if private.clipping.clips_in_backward else noise_bound
    if clip != noise_bound:
        sigma = sigma * noise_bound / clip
    return Mechanism(noise_multiplier=sigma, sample_rate=_sample_rate(loader), max_grad_norm=clip)


def _sample_rate(loader) -> float:
    """The Poisson rate of a record loader's sampler, or of :class:`dpops.train.user_level.UserBatches`'s."""
    if isinstance(loader, users.UserBatches):
        return loader.sample_rate
    return float(loader.batch_sampler.sample_rate)


__all__ = [
    "CLIPPED_IN_BACKWARD",
    "CLIPPING_MODES",
    "ClippingMode",
    "Mechanism",
    "PrivateModel",
    "clipping_mode",
    "make_private",
    "mechanism_ran",
    "noisy_step",
    "pieces",
    "register_clipping_mode",
]
