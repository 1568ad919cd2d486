"""RDP privacy filters: the guaranteed cumulative epsilon a dataset's ledger admits against.

A dataset's filter (:class:`PrivacyFilter`: fixed orders and the share of delta each gets) is fixed
when the dataset is registered (:func:`choose_filter`, :func:`filter_of_orders`, :data:`GRID_FILTER`)
and stored in its ``registered`` event; the per-mechanism RDP it sums is :mod:`dpops.privacy.accounting`'s.

Why the filter is valid when later runs are chosen after seeing earlier ones
-----------------------------------------------------------------------------

Recurring fine-tunes are adaptive: a run's noise, steps and even whether it happens at all may
depend on what earlier runs released. Summing RDP and converting at the best order *after the
fact* is not valid then, because the best order is chosen from the history. A privacy filter is:

* **One order** (Feldman & Zrnic 2021, "Individual privacy accounting via a Renyi filter",
  Theorem 3.1). Fix an order ``alpha`` and a budget ``B`` before anything runs. Admit a run with
  RDP ``rho_t(alpha)`` (itself chosen adaptively) only while ``sum_t rho_t(alpha) <= B``. The whole
  interaction is then ``(alpha, B)``-RDP, and so ``(B + log((alpha-1)/alpha) - (log(delta) +
  log(alpha))/(alpha-1), delta)``-DP by the conversion of :func:`dpops.privacy.accounting.rdp_to_epsilon` (Canonne, Kamath
  & Steinke 2020): delta is not split.
* **Several orders** (Lecuyer 2021, "Practical privacy filters and odometers with Renyi
  differential privacy"; the union over orders). Fix orders ``alpha_1..alpha_k``, shares
  ``s_1..s_k`` of delta (``sum s_i <= 1``) and the epsilon cap in advance; order ``i``'s budget
  ``B_i`` is the RDP that converts to the cap at ``delta * s_i``. Admit a run while *some* order
  stays within its budget. For each order, the privacy-loss process stopped when that order's
  budget would be exceeded is a supermartingale, so the loss exceeds the cap with probability at
  most ``delta * s_i`` on the event that order ``i`` stayed within budget; every admitted history
  ends with at least one order within budget, and a union bound over the ``k`` orders gives
  ``(cap, delta)``-DP.

So what must be fixed in advance is the set of orders and the split of delta; the mechanisms need
not be. dpops fixes them **per dataset, once, when it is registered** (:func:`choose_filter`:
the single order that admits the most runs of the mechanism the registering job plans, or the
orders a dataset config names), stores them in the dataset's hash-chained ``registered`` event,
and never changes them. A single order keeps all of delta; a grid pays ``log k / (alpha - 1)`` for
its flexibility. Ledgers written before per-dataset filters keep ``rdp-filter-v1``: the fixed grid
:data:`FILTER_ORDERS` with delta split evenly, and the same meaning.

Example:
    >>> run = SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
    >>> f = choose_filter(run, cap=8.0, delta=1e-5)
    >>> f.orders, f.runs_left([], run, delta=1e-5, cap=8.0)
    ((3.75,), 13)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from dpops.privacy.accounting import (
    SubsampledGaussian,
    _check_delta,
    _rdp_one_step,
    _smallest_sigma,
    conversion,
    merge,
)

#: The fixed grid of ``rdp-filter-v1`` (delta split evenly across it), and of :data:`GRID_FILTER`,
#: the filter a dataset gets when nothing tells what its jobs will run.
FILTER_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0,
    10.0, 12.0, 14.0, 16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 56.0, 64.0,
)

#: The filter of ledgers written before per-dataset filters: :data:`FILTER_ORDERS`, delta split evenly.
FILTER_V1 = "rdp-filter-v1"
#: A per-dataset filter: its orders and delta shares are stored in the dataset's ``registered`` event.
FILTER_V2 = "rdp-filter-v2"
#: The filter new datasets are registered with.
FILTER_NAME = FILTER_V2
#: The filters this code implements.
FILTERS = (FILTER_V1, FILTER_V2)

#: Orders :func:`choose_filter` picks a dataset's order from: steps of 0.05 up to 20, where the
#: best order of a typical DP-SGD run lies (its RDP can rise several-fold within one unit of order
#: at small sigma, so a coarse grid costs runs), then coarser up to 4096 so that small epsilons
#: (large orders) are not floored.
CANDIDATE_ORDERS: tuple[float, ...] = (
    *(round(1 + k * 0.05, 2) for k in range(1, 381)), *map(float, range(21, 129)), *map(float, range(136, 513, 8)),
    *map(float, range(576, 4097, 64)),
)
#: Bounds on the orders a filter may name (a config's ``privacy.filter_orders`` included).
MAX_FILTER_ORDER = 10_000.0
MAX_FILTER_ORDERS = 64

@dataclass(frozen=True)
class PrivacyFilter:
    """An RDP privacy filter: fixed orders and the share of delta each one gets (module docstring).

    ``epsilon(state)`` is the smallest cap the filter would still honour with RDP ``state`` spent:
    the minimum over its orders of the conversion at ``delta * share``; ``0.0`` for a state
    with nothing spent (no conversion constant of an empty filter). A dataset's filter is fixed when
    it is registered and stored in its ``registered`` event (:meth:`spec`).

    Raises:
        ValueError: an unknown name, no orders, an order not in (1, MAX_FILTER_ORDER], repeated
            orders, a share not in (0, 1], shares that add up to more than 1, or a v1 filter that
            is not the v1 grid.

    Example: the first charge pays the conversion at the filter's order, so one run's cumulative
    figure is above its run epsilon; yet the order chosen for the mechanism admits more runs of
    it (13) than the grid of 24 orders does (10).

        >>> from dpops.privacy.accounting import epsilon
        >>> run = SubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=1000)
        >>> f = choose_filter(run, cap=8.0, delta=1e-5)
        >>> round(f.epsilon([run], delta=1e-5), 3), round(epsilon([run], delta=1e-5), 3), f.epsilon([], delta=1e-5)
        (3.734, 2.101, 0.0)
        >>> f.admits([run] * 12, run, delta=1e-5, cap=8.0), f.admits([run] * 13, run, delta=1e-5, cap=8.0)
        (True, False)
        >>> GRID_FILTER.runs_left([], run, delta=1e-5, cap=8.0)
        10
    """

    name: str
    orders: tuple[float, ...]
    delta_shares: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.name not in FILTERS:
            raise ValueError(f"privacy filter must be one of {list(FILTERS)}. Found {self.name!r}.")
        orders, shares = tuple(float(a) for a in self.orders), tuple(float(s) for s in self.delta_shares)
        object.__setattr__(self, "orders", orders)
        object.__setattr__(self, "delta_shares", shares)
        if not 1 <= len(orders) <= MAX_FILTER_ORDERS or len(shares) != len(orders):
            raise ValueError(f"a privacy filter needs 1 to {MAX_FILTER_ORDERS} orders and one delta share per order. "
                             f"Found {len(orders)} orders and {len(shares)} shares.")
        bad = [a for a in orders if not 1 < a <= MAX_FILTER_ORDER]  # nan fails too
        if bad:
            raise ValueError(f"filter orders must be in (1, {MAX_FILTER_ORDER:g}]. Found {bad[0]}.")
        if len(set(orders)) != len(orders):
            raise ValueError("filter orders must be distinct.")
        if not all(0 < s <= 1 for s in shares) or not math.fsum(shares) <= 1 + 1e-12:
            raise ValueError(f"delta shares must be in (0, 1] and add up to at most 1. Found a sum of {math.fsum(shares)}.")
        if self.name == FILTER_V1 and (orders != FILTER_ORDERS or shares != _even(len(FILTER_ORDERS))):
            raise ValueError(f"{FILTER_V1} is the fixed grid FILTER_ORDERS with delta split evenly.")

    @classmethod
    def from_spec(cls, name: str, spec: Optional[dict[str, Any]]) -> "PrivacyFilter":
        """The filter a ``registered`` event names: v1 has no spec; v2 needs ``orders`` and
        ``delta_shares``. Raises ValueError on anything else.

        >>> f = filter_of_orders([8, 2, 4])
        >>> f.spec_json()
        '{"delta_shares":[0.3333333333333333,0.3333333333333333,0.3333333333333333],"orders":[2.0,4.0,8.0]}'
        >>> PrivacyFilter.from_spec(f.name, f.spec()) == f, PrivacyFilter.from_spec(FILTER_V1, None) is V1_FILTER
        (True, True)
        """
        if name == FILTER_V1:
            if spec is not None:
                raise ValueError(f"{FILTER_V1} has no stored orders")
            return V1_FILTER
        if name != FILTER_V2:
            raise ValueError(f"privacy filter must be one of {list(FILTERS)}. Found {name!r}.")
        if not isinstance(spec, dict) or set(spec) != {"orders", "delta_shares"}:
            raise ValueError(f"{FILTER_V2} needs its orders and delta shares")
        return cls(FILTER_V2, tuple(spec["orders"]), tuple(spec["delta_shares"]))

    def spec(self) -> Optional[dict[str, list[float]]]:
        """What the ``registered`` event stores (None for v1, whose grid is fixed in code)."""
        if self.name == FILTER_V1:
            return None
        return {"orders": list(self.orders), "delta_shares": list(self.delta_shares)}

    def spec_json(self) -> Optional[str]:
        """:meth:`spec` as canonical JSON (the ``datasets.filter_spec`` column)."""
        spec = self.spec()
        return None if spec is None else json.dumps(spec, sort_keys=True, separators=(",", ":"))

    def describe(self) -> str:
        """One line for people, e.g. ``"rdp-filter-v2: order 14 (all of delta)"``.

        >>> choose_filter(SubsampledGaussian(1.0, 0.01, 1000), cap=8.0, delta=1e-5).describe()
        'rdp-filter-v2: order 3.75 (all of delta)'
        >>> GRID_FILTER.describe()
        'rdp-filter-v2: 24 orders 1.25 to 64, delta split evenly'
        """
        if len(self.orders) == 1:
            return f"{self.name}: order {self.orders[0]:g} (all of delta)"
        even = self.delta_shares == _even(len(self.orders))
        return (f"{self.name}: {len(self.orders)} orders {self.orders[0]:g} to {self.orders[-1]:g}"
                + (", delta split evenly" if even else ", delta split by stored shares"))

    def one_step(self, sigma: float, q: float) -> list[float]:
        """RDP of one step of (sigma, q) at the filter's orders, as plain floats (the ledger
        stores it beside each spend total)."""
        return [float(x) for x in _rdp_one_step(float(sigma), float(q), self.orders)]

    def rdp(self, events: Iterable[SubsampledGaussian]) -> np.ndarray:
        """The filter state of ``events``: their RDP curves summed at the filter's orders."""
        total = np.zeros(len(self.orders))
        for event in merge(events):
            total += event.rdp(self.orders)
        return total

    def epsilon_from_rdp(self, state: np.ndarray, *, delta: float) -> float:
        """Guaranteed epsilon of a filter state (see the class docstring)."""
        _check_delta(delta)
        state = np.asarray(state, dtype=float)
        if state.shape != (len(self.orders),):
            raise ValueError(f"a state of {self.name} has {len(self.orders)} orders. Found shape {state.shape}.")
        if not np.any(state):
            return 0.0
        return float(np.min(state + self._conversion(delta)))

    def epsilon(self, events: Iterable[SubsampledGaussian], *, delta: float) -> float:
        """Guaranteed cumulative epsilon of ``events`` under adaptive composition."""
        return self.epsilon_from_rdp(self.rdp(events), delta=delta)

    def admits(self, spent: Iterable[SubsampledGaussian], new: SubsampledGaussian, *, delta: float, cap: float) -> bool:
        """True when adding ``new`` to ``spent`` keeps the filter within ``cap``."""
        return self.epsilon(list(spent) + [new], delta=delta) <= cap

    def runs_left(self, spent: Iterable[SubsampledGaussian] | np.ndarray, mechanism: SubsampledGaussian, *, delta: float,
                  cap: float, limit: int = 100_000, one_step: Optional[Sequence[float]] = None) -> int:
        """How many more runs of ``mechanism`` the filter admits after ``spent`` (events or a state),
        at most ``limit``. ``one_step``: the mechanism's one-step curve at the filter's orders, if
        already known (the ledger stores it)."""
        state = np.asarray(spent, dtype=float) if isinstance(spent, np.ndarray) else self.rdp(spent)
        step = (np.asarray(one_step, dtype=float) * mechanism.steps if one_step is not None
                else mechanism.rdp(self.orders))
        room = cap - self._conversion(delta) - state
        with np.errstate(divide="ignore", invalid="ignore"):
            per_order = np.where(step > 0, np.floor(room / step), np.where(room >= 0, limit, -1))
        k = int(min(limit, max(0.0, float(np.nanmax(per_order)))))
        ok = lambda k: self.epsilon_from_rdp(state + k * step, delta=delta) <= cap  # noqa: E731 (rounding at the edge)
        while k > 0 and not ok(k):
            k -= 1
        while k < limit and ok(k + 1):
            k += 1
        return k

    def _conversion(self, delta: float) -> np.ndarray:
        """Per order, the epsilon an RDP of 0 converts to at ``delta * share`` (the state is added)."""
        return conversion(self.orders, delta * np.asarray(self.delta_shares))


def _even(k: int) -> tuple[float, ...]:
    return tuple([1.0 / k] * k)


#: The filter of ledgers written before per-dataset filters (``rdp-filter-v1``).
V1_FILTER = PrivacyFilter(FILTER_V1, FILTER_ORDERS, _even(len(FILTER_ORDERS)))
#: The filter a dataset gets when nothing says what its jobs run: v1's grid, stored as a v2 filter.
GRID_FILTER = PrivacyFilter(FILTER_V2, FILTER_ORDERS, _even(len(FILTER_ORDERS)))


def filter_of_orders(orders: Sequence[float]) -> PrivacyFilter:
    """A v2 filter over ``orders`` (sorted), delta split evenly: what a dataset config's
    ``privacy.filter_orders`` asks for."""
    orders = tuple(sorted(float(a) for a in orders))
    return PrivacyFilter(FILTER_V2, orders, _even(len(orders)))


def choose_filter(mechanism: SubsampledGaussian, *, cap: float, delta: float,
                  candidates: Sequence[float] = CANDIDATE_ORDERS) -> PrivacyFilter:
    """The single-order filter that admits the most runs of ``mechanism`` within ``cap``.

    Among ``candidates``, the order maximising ``(cap - conversion(alpha, delta)) / RDP_run(alpha)``
    (the floor of which is the number of runs admitted, so the maximiser admits the most). It uses
    only what the job's config and the public record count give (sigma, q, steps), never the data,
    so choosing it before any run keeps the filter valid under adaptivity (module docstring).

    The search is coarse to fine (every 8th candidate, then every candidate between the best one's
    neighbours): about a fifth of the RDP evaluations. It finds the maximum over all candidates when
    the ratio is unimodal in the order, as it is for the subsampled Gaussian (the conversion falls
    and the RDP rises with the order); either way the order it returns is valid, only possibly not
    the very best.
    """
    _check_delta(delta)
    a = np.asarray(sorted(float(x) for x in candidates))
    value = np.full(len(a), -np.inf)

    def score(idx: np.ndarray) -> None:
        idx = idx[np.isneginf(value[idx])]
        if not idx.size:
            return
        orders = a[idx]
        step = np.asarray(mechanism.rdp(tuple(orders)), dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            value[idx] = np.where(np.isfinite(step) & (step > 0), (cap - conversion(orders, delta)) / step, -np.inf)

    coarse = np.unique(np.r_[np.arange(0, len(a), 8), len(a) - 1])
    score(coarse)
    best = int(np.argmax(value))
    if not np.isfinite(value[best]):
        return GRID_FILTER
    k = int(np.searchsorted(coarse, best))
    score(np.arange(coarse[max(0, k - 1)], coarse[min(len(coarse) - 1, k + 1)] + 1))
    return PrivacyFilter(FILTER_V2, (float(a[int(np.argmax(value))]),), (1.0,))


def filter_rdp(events: Iterable[SubsampledGaussian], privacy_filter: Optional[PrivacyFilter] = None) -> np.ndarray:
    """Sum of the events' RDP curves at the filter's orders (default :data:`GRID_FILTER`)."""
    return (privacy_filter or GRID_FILTER).rdp(events)


def filter_rdp_one_step(sigma: float, q: float, privacy_filter: Optional[PrivacyFilter] = None) -> list[float]:
    """RDP of one step of (sigma, q) at the filter's orders (default :data:`GRID_FILTER`)."""
    return (privacy_filter or GRID_FILTER).one_step(sigma, q)


def filter_epsilon_from_rdp(total_rdp: np.ndarray, *, delta: float, privacy_filter: Optional[PrivacyFilter] = None) -> float:
    """Guaranteed epsilon of a filter state (default :data:`GRID_FILTER`)."""
    return (privacy_filter or GRID_FILTER).epsilon_from_rdp(total_rdp, delta=delta)


def filter_epsilon(events: Iterable[SubsampledGaussian], *, delta: float, privacy_filter: Optional[PrivacyFilter] = None) -> float:
    """Guaranteed cumulative epsilon under adaptive composition (default :data:`GRID_FILTER`)."""
    return (privacy_filter or GRID_FILTER).epsilon(events, delta=delta)


def filter_admits(
    spent: Iterable[SubsampledGaussian], new: SubsampledGaussian, *, delta: float, cap: float,
    privacy_filter: Optional[PrivacyFilter] = None,
) -> bool:
    """True when adding ``new`` to ``spent`` keeps the filter within ``cap``."""
    return (privacy_filter or GRID_FILTER).admits(spent, new, delta=delta, cap=cap)


def calibrate_noise_to_filter(
    *,
    spent: Iterable[SubsampledGaussian],
    cap: float,
    runs: int,
    sample_rate: float,
    steps: int,
    delta: float,
    tolerance: float = 0.01,
    sigma_max: float = 1000.0,
    privacy_filter: Optional[PrivacyFilter] = None,
) -> float:
    """Smallest noise multiplier that lets ``runs`` runs like this one still pass the filter
    (the dataset's ``privacy_filter``; default :data:`GRID_FILTER`).

    "Fit to the remaining budget": with the dataset's counted history ``spent``, the returned
    sigma keeps ``filter_epsilon(spent + runs x (sigma, q, steps)) <= cap``, so this run and
    ``runs - 1`` more identical ones are all admissible. Noise is chosen before the run, from
    the ledger's state, which the filter allows (adaptive composition).

    Raises:
        ValueError: no sigma up to ``sigma_max`` fits (the budget is, in practice, spent).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1. Found {runs}.")
    _check_delta(delta)
    f = privacy_filter or GRID_FILTER
    base = f.rdp(spent)
    return _smallest_sigma(
        lambda sigma: f.epsilon_from_rdp(base + SubsampledGaussian(sigma, sample_rate, steps * runs).rdp(f.orders),
                                         delta=delta) <= cap,
        tolerance=tolerance, sigma_max=sigma_max,
        failure=f"{runs} run(s) of {steps} steps at sample_rate={sample_rate} within cap {cap} at delta={delta}",
    )
