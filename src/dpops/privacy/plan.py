"""The plan of one private run: the mechanism the accountant assumes and the trainer must run.

A :class:`Plan` is pure data (no config, no ledger): :mod:`dpops.pipeline.planning` makes one from a
dataset's config and its ledger state, the ledger charges it, and the trainer
(:func:`dpops.train.trainer.authorize`) refuses to run a plan that differs from its charge
(:func:`charge_differences`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Optional

from dpops.errors import ConfigError
from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian

if TYPE_CHECKING:  # the ledger's record of a charge, read by attribute only
    from dpops.ledger.states import Charge


@dataclass(frozen=True)
class Plan:
    """Everything the accountant assumes about a run; the trainer must run exactly this."""

    dataset: str
    n_records: int
    sample_rate: float
    expected_batch_size: float
    steps: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float
    epsilon: float  # run epsilon of the plan, <= target_epsilon
    #: With ``dp.fit_to_budget``: the runs (this one included) the remaining budget was spread over.
    fitted_runs: Optional[int] = None
    sampler: str = accounting.SAMPLER_POISSON
    accountant: str = "rdp"
    #: Partitioned datasets only: the blocks this run reads, oldest first. The reservation names
    #: exactly these and the trainer reads only their records. None: the dataset has no blocks.
    blocks: Optional[list[str]] = None
    #: The privacy filter (name, orders, delta_shares) the plan was made with: the ledger's for a
    #: registered dataset; otherwise the one `reserve` registers the dataset with (see :func:`filter_for`).
    #: A dataset's filter is fixed at registration: for a registered dataset this is informative only.
    privacy_filter: Optional[dict[str, Any]] = None

    @property
    def mechanism(self) -> SubsampledGaussian:
        return SubsampledGaussian(self.noise_multiplier, self.sample_rate, self.steps)

    @property
    def filter(self) -> Optional[filters.PrivacyFilter]:
        """:attr:`privacy_filter` as a :class:`~dpops.privacy.filters.PrivacyFilter` (None if absent)."""
        return filter_from_dict(self.privacy_filter)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def filter_from_dict(f: Optional[dict[str, Any]]) -> Optional[filters.PrivacyFilter]:
    """A plan's ``privacy_filter`` field as a filter (None if absent). Raises ConfigError if it is not a valid one."""
    if f is None:
        return None
    try:
        return filters.PrivacyFilter(f["name"], tuple(f["orders"]), tuple(f["delta_shares"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the plan's field 'privacy_filter' is not a valid privacy filter ({exc}); plan again") from None


def charge_differences(p: Plan, charge: Charge, *, unit: str, delta: Optional[float] = None) -> list[str]:
    """Every way the mechanism ``p`` describes differs from the one ``charge`` admitted (empty: none).

    Compared exactly (JSON and the ledger's doubles carry a float unchanged): the dataset, sigma,
    q, steps, clipping bound C, n, the unit of privacy (``unit``: what the run trains with) and the
    blocks read; and the plan's expected batch size must be q * n, the one it was planned with.
    With ``delta`` (the dataset's delta as the ledger registered it; a charge does not carry it),
    the plan's delta too: every epsilon the run reports is computed at it. Only figures are named,
    never records.
    """
    mechanism = charge.mechanism
    pairs = [
        ("dataset", p.dataset, charge.dataset),
        ("noise_multiplier", p.noise_multiplier, mechanism.noise_multiplier),
        ("sample_rate", p.sample_rate, mechanism.sample_rate),
        ("steps", p.steps, mechanism.steps),
        ("max_grad_norm", p.max_grad_norm, charge.max_grad_norm),
        ("n_records", p.n_records, charge.n_records),
        ("unit", unit, charge.unit),
        ("blocks", sorted(p.blocks or []), sorted(charge.blocks)),
    ]
    if delta is not None:
        pairs.append(("delta", p.delta, delta))
    found = [f"{name} {mine!r} (charged: {charged!r})" for name, mine, charged in pairs if mine != charged]
    if not math.isclose(p.expected_batch_size, p.sample_rate * p.n_records, rel_tol=1e-12):
        found.append(f"expected_batch_size {p.expected_batch_size!r} (q * n: {p.sample_rate * p.n_records!r})")
    return found


def sample_rate_for(n_records: int, expected_batch_size: int) -> float:
    """q = 1 / ceil(n / B): the convention of Opacus's DP data loader, so planned and used agree.

    >>> sample_rate_for(1024, 64), sample_rate_for(1025, 64)  # 16 batches; one record more: 17
    (0.0625, 0.058823529411764705)
    """
    return 1.0 / math.ceil(n_records / expected_batch_size)
