"""The learning rate over the planned steps and the average of the weights: post-processing of the noisy gradients.

The optimizer is AdamW (built by :func:`dpops.train.trainer.train`), with an optional
learning-rate schedule over the planned steps (:func:`learning_rate_factor`) and an optional
moving average of the weights (:class:`WeightAverage`), both set in ``optim``. Both only
post-process the noisy gradients, so neither costs privacy.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dpops.config.schema import OptimSettings


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


__all__ = ["WeightAverage", "learning_rate_factor"]
