"""Privacy accounting: pure functions over mechanism descriptions.

Nothing here holds state. The ledger stores :class:`SubsampledGaussian` events, and every
epsilon dpops shows is recomputed from them by the functions below; per-run epsilons are never
added up.

Two figures exist, and the code and the UI keep them apart:

* **run epsilon** (:func:`epsilon`): the usual RDP accountant for one fixed sequence of
  mechanisms, converted to (epsilon, delta) at the best order of :data:`RDP_ORDERS`. This is what
  Opacus's and Google's ``dp_accounting`` RDP accountants report, and the tests pin it to both.
* **guaranteed cumulative epsilon** (:class:`dpops.privacy.filters.PrivacyFilter`): the figure the
  ledger admits against, under **fully adaptive composition**; why it is valid there is
  :mod:`dpops.privacy.filters`.

The RDP of one step (Mironov, Talwar & Zhang 2019) is ``dp_accounting``'s, through its public
``RdpAccountant``; at fractional orders where its series does not converge (it then reports
infinity), :func:`_integral_rdp` computes the same quantity by quadrature, an upper bound (its
error estimate added), and the tests pin it to Opacus's series.

Example:
    >>> run = SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    >>> round(epsilon([run], delta=1e-5), 3)
    2.101
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

#: Orders of the run accountant: the default grid of Opacus's RDP accountant.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

SAMPLER_POISSON = "poisson"
KIND_SUBSAMPLED_GAUSSIAN = "subsampled_gaussian"

_absl = logging.getLogger("absl")


@dataclass(frozen=True)
class SubsampledGaussian:
    """DP-SGD: ``steps`` compositions of the Gaussian mechanism on Poisson-subsampled batches.

    Args:
        noise_multiplier: sigma, the noise std divided by the clipping bound. Must be > 0.
        sample_rate: q, each record's independent probability of joining a batch, in (0, 1].
        steps: number of noisy steps, >= 0.

    Raises:
        ValueError: on any parameter out of range; the message echoes the bad value.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a positive finite number. Found {self.noise_multiplier}.")
        if not (0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1]. Found {self.sample_rate}.")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer. Found {self.steps}.")

    def rdp(self, orders: Sequence[float]) -> np.ndarray:
        """RDP curve of this event at ``orders`` (Mironov, Talwar & Zhang 2019): ``steps`` times
        :func:`rdp_one_step` (RDP is linear in steps)."""
        if self.steps == 0:
            return np.zeros(len(orders))
        return np.asarray(_rdp_one_step(float(self.noise_multiplier), float(self.sample_rate), tuple(orders))) * int(self.steps)


def rdp_one_step(sigma: float, q: float, orders: Sequence[float]) -> np.ndarray:
    """RDP of one step of the Poisson-subsampled Gaussian at ``orders``.

    ``dp_accounting``'s public ``RdpAccountant`` (``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``,
    read ``.rdp``); where its fractional-order series does not converge it reports infinity, and
    :func:`_integral_rdp` gives the value there instead (an upper bound, never a smaller one), so
    no order is lost to a numerical failure.
    """
    return np.asarray(_rdp_one_step(float(sigma), float(q), tuple(float(a) for a in orders)))


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(sigma: float, q: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(list(orders))
    quiet = _absl.level
    _absl.setLevel(logging.ERROR)  # its "failed to converge" warnings: handled below
    try:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 1)
    finally:
        _absl.setLevel(quiet)
    out = [float(x) for x in np.asarray(accountant.rdp, dtype=float)]
    for i, alpha in enumerate(orders):
        if not math.isfinite(out[i]) and q < 1:
            out[i] = _integral_rdp(sigma, q, alpha)
    return tuple(out)


def _integral_rdp(sigma: float, q: float, alpha: float) -> float:
    """RDP of one Poisson-subsampled Gaussian step at ``alpha``, by quadrature: an upper bound.

    ``log(A_alpha) / (alpha - 1)`` with ``A_alpha = E_{z ~ N(0, sigma^2)}[((1-q) + q exp((2z-1) /
    (2 sigma^2)))^alpha]``, the quantity whose series ``dp_accounting`` and Opacus sum (Mironov,
    Talwar & Zhang 2019, Sec. 3.3: it bounds both directions of the divergence). The integrand is
    scaled by its peak, integrated over the real line by adaptive quadrature, and the quadrature's
    own error estimate is added, then a relative 1e-9 more: the result is never below the value.
    Infinity when the quadrature cannot vouch for its result.
    """
    from scipy import integrate, optimize

    s2 = sigma * sigma
    log_norm = -0.5 * math.log(2 * math.pi * s2)

    def log_f(z: float) -> float:
        return log_norm - z * z / (2 * s2) + alpha * float(np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * s2)))

    peak = optimize.minimize_scalar(lambda z: -log_f(z), bounds=(-60 * sigma, 60 * sigma + 60), method="bounded")
    top = max(log_f(peak.x), log_f(0.0), log_f(1.0))
    value, error = integrate.quad(lambda z: math.exp(log_f(z) - top), -np.inf, np.inf, epsabs=0.0, epsrel=1e-12, limit=500)
    if not (value > 0 and math.isfinite(value) and math.isfinite(error) and error < 1e-6 * value):
        return math.inf
    return max(0.0, (top + math.log(value + error)) / (alpha - 1)) * (1 + 1e-9)


def _check_delta(delta: float) -> None:
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1). Found {delta}.")


def conversion(orders: Sequence[float] | np.ndarray, delta: float | np.ndarray) -> np.ndarray:
    """Per order, the epsilon an RDP of 0 converts to at ``delta`` (a number, or one per order):
    ``log((a-1)/a) - (log(delta) + log(a)) / (a-1)``, the conversion of :func:`rdp_to_epsilon`.

    It falls with the order: a filter at a low order pays more before the first step is spent.

    >>> [round(float(x), 3) for x in conversion([2.0, 8.0, 32.0], 1e-5)]
    [10.127, 1.214, 0.228]
    """
    a = np.asarray(orders, dtype=float)
    return np.log((a - 1) / a) - (np.log(delta) + np.log(a)) / (a - 1)


def rdp_to_epsilon(rdp: np.ndarray, orders: Sequence[float], delta: float) -> tuple[float, float]:
    """Convert an RDP curve to (epsilon, best order) at ``delta``.

    Uses the conversion of Canonne, Kamath & Steinke (2020) / Asoodeh et al., the one Opacus and
    ``dp_accounting`` use: ``eps = rdp + log((a-1)/a) - (log(delta) + log(a)) / (a-1)``.

    Returns:
        ``(epsilon, order)``; epsilon is ``inf`` when no order gives a finite value.
    """
    _check_delta(delta)
    a = np.asarray(orders, dtype=float)
    rdp = np.asarray(rdp, dtype=float)
    if a.shape != rdp.shape:
        raise ValueError(f"orders and rdp must have the same shape. Found {a.shape} and {rdp.shape}.")
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = rdp + conversion(a, delta)
    # Non-finite RDP (e.g. q=1 at huge orders) means no guarantee at that order.
    eps = np.where(np.isfinite(rdp), eps, np.inf)
    i = int(np.nanargmin(eps))
    return max(0.0, float(eps[i])), float(a[i])


def epsilon(events: Iterable[SubsampledGaussian], *, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """Run epsilon: RDP composition of a fixed sequence of events at ``delta``, at the best of ``orders``.

    This equals ``dp_accounting``'s ``RdpAccountant`` over :data:`RDP_ORDERS` (to 1e-6 relative)
    wherever its series converges, and is never below Opacus's ``RDPAccountant.get_epsilon`` for
    the same history. Where it does not (fractional orders at large q), ``dp_accounting`` drops
    the order and dpops keeps the quadrature bound, so for such mechanisms dpops's figure can be
    the lower (tighter) of the two.
    """
    orders = tuple(float(a) for a in orders)
    total = np.zeros(len(orders))
    for event in merge(events):
        total += event.rdp(orders)
    return rdp_to_epsilon(total, orders, delta)[0]


def pld_epsilon(events: Iterable[SubsampledGaussian], *, delta: float, discretization: float = 1e-3) -> float:
    """A tight **estimate** from privacy loss distributions (Google ``dp_accounting``'s PLD
    accountant, pessimistic discretization) for the same charges as a fixed, non-adaptive
    sequence. Reported beside the guaranteed figure; never used for admission.
    """
    _check_delta(delta)
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    acc = PLDAccountant(value_discretization_interval=discretization)
    for e in merge(events):
        if e.steps:
            acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)), e.steps)
    return max(0.0, float(acc.get_epsilon(delta)))


def merge(events: Iterable[SubsampledGaussian]) -> list[SubsampledGaussian]:
    """Merge events with the same (sigma, q) by adding their steps.

    RDP composes additively and the Gaussian's RDP is linear in steps, so this changes no figure
    while making a long history cost one evaluation per distinct mechanism.

    Example:
        >>> merge([SubsampledGaussian(1.0, 0.01, 10), SubsampledGaussian(1.0, 0.01, 5)])
        [SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=15)]
    """
    steps: dict[tuple[float, float], int] = {}
    for e in events:
        key = (float(e.noise_multiplier), float(e.sample_rate))
        steps[key] = steps.get(key, 0) + int(e.steps)
    return [SubsampledGaussian(sigma, q, n) for (sigma, q), n in steps.items()]


def calibrate_noise(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    tolerance: float = 0.01,
    sigma_max: float = 1000.0,
) -> float:
    """Smallest noise multiplier whose run epsilon is at most ``target_epsilon``.

    Bisection in sigma; the returned sigma satisfies ``epsilon <= target_epsilon`` (never above)
    and is within ``tolerance`` of the smallest such sigma.

    Raises:
        ValueError: on an out-of-range argument, or if even ``sigma_max`` cannot reach the target.

    Example:
        >>> s = calibrate_noise(target_epsilon=3.0, sample_rate=0.01, steps=500, delta=1e-5)
        >>> epsilon([SubsampledGaussian(s, 0.01, 500)], delta=1e-5) <= 3.0
        True
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be a positive finite number. Found {target_epsilon}.")
    _check_delta(delta)
    return _smallest_sigma(
        lambda sigma: epsilon([SubsampledGaussian(sigma, sample_rate, steps)], delta=delta) <= target_epsilon,
        tolerance=tolerance, sigma_max=sigma_max,
        failure=f"target_epsilon={target_epsilon} with sample_rate={sample_rate}, steps={steps}, delta={delta}",
    )


def _smallest_sigma(ok: Callable[[float], bool], *, tolerance: float, sigma_max: float, failure: str) -> float:
    """Bisection for the smallest sigma with ``ok(sigma)`` (``ok`` must be monotone in sigma);
    the result always satisfies ``ok`` and is within ``tolerance`` of the smallest such sigma."""
    hi = min(1.0, sigma_max)
    while not ok(hi):
        if hi >= sigma_max:
            raise ValueError(f"no noise multiplier up to {sigma_max} reaches {failure}.")
        hi = min(hi * 2, sigma_max)
    lo = 0.0
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        if mid > 0 and ok(mid):
            hi = mid
        else:
            lo = mid
    return hi
