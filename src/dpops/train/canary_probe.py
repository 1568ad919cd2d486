"""White-box gradient canaries in the DP step (``audit.gradient_canaries``): injected before noise, read after it.

Dirac canary gradients of norm exactly C, each Poisson-sampled at q like a record, are added to
the clipped sum before noise, and each step's released noisy sum is read at their coordinates
(:class:`GradientCanaryProbe`). What is read is post-processing of the DP output; the audit
(:mod:`dpops.assess.audit`) scores it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dpops.assess.canaries import GradientCanaries, gradient_coordinates
from dpops.errors import TrainingError
from dpops.privacy.plan import Plan
from dpops.train.private_step import Mechanism, PrivateModel


class GradientCanaryProbe:
    """Adds the included Dirac gradient canaries to each DP step and observes the released noisy sums.

    Injection (:meth:`attach` wraps the DP optimizer's ``add_noise``): Opacus calls ``add_noise``
    exactly once per logical step, once the clipped gradients of every physical piece are summed
    in ``p.summed_grad``; on a piece that ``signal_skip_step`` skips, ``pre_step`` returns before
    it. This holds for the four DP optimizers :func:`dpops.train.private_step.make_private`
    builds (``DPOptimizer``, ``DPOptimizerFastGradientClipping`` and their ``Distributed``
    versions, which add noise on rank 0 and pass the sum on unchanged elsewhere). Just before the noise, each included canary is
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


def save_observations(probe: GradientCanaryProbe, path: Path, steps: int) -> Path:
    """Save the probe's observations (one row per step taken, checked) as float32 .npy."""
    observed = probe.observations()
    if observed.shape[0] != steps or probe.injections != steps:
        raise TrainingError(f"gradient canaries: {probe.injections} injections and {observed.shape[0]} observations "
                           f"for {steps} steps")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, observed)
    return path


__all__ = ["GradientCanaryProbe", "save_observations"]
