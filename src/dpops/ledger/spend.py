"""The spend index's arithmetic: one-step RDP curves at a dataset's filter orders, and the filter's epsilon.
"""

from __future__ import annotations

import functools
import json
from typing import Optional

import numpy as np

from dpops.errors import (
    LedgerError,
)
from dpops.privacy import filters
from dpops.privacy.accounting import SubsampledGaussian


@functools.lru_cache(maxsize=65536)
def _mechanism(sigma: float, q: float, steps: int) -> SubsampledGaussian:
    return SubsampledGaussian(sigma, q, steps)  # validated once per distinct value


def _rdp_json(f: filters.PrivacyFilter, sigma: float, q: float) -> str:
    """The stored one-step RDP curve of (sigma, q) at the filter's orders (see migration 0004)."""
    return json.dumps(f.one_step(sigma, q))


def _epsilon(f: filters.PrivacyFilter, base_rdp: np.ndarray, new: Optional[SubsampledGaussian], delta: float) -> float:
    """The filter's guaranteed epsilon with state ``base_rdp``, plus ``new`` if given."""
    total = base_rdp if new is None else base_rdp + new.rdp(f.orders)
    return f.epsilon_from_rdp(total, delta=delta)


@functools.lru_cache(maxsize=256)
def _filter(accountant: Optional[str], spec: Optional[str]) -> filters.PrivacyFilter:
    """The privacy filter a dataset was registered with (``datasets.accountant``, ``.filter_spec``).

    Raises:
        LedgerError: a filter this code does not implement, or a v2 spec that is not a valid one.
    """
    if accountant not in filters.FILTERS:
        raise LedgerError(f"privacy filter {accountant!r}, which this code does not implement (it implements "
                          f"{', '.join(repr(n) for n in filters.FILTERS)})")
    try:
        return filters.PrivacyFilter.from_spec(accountant, None if spec is None else json.loads(spec))
    except (ValueError, TypeError) as exc:
        raise LedgerError(f"privacy filter {accountant!r} with a stored spec that is not valid ({exc})") from None
