"""The mathematics of the guarantee: mechanisms and accountants (:mod:`.accounting`), RDP filters
(:mod:`.filters`) and the run's plan (:mod:`.plan`).

Pure Python and NumPy over dp_accounting: no torch, no database, no config. Everything that reads
a config or a ledger to choose a plan is :mod:`dpops.pipeline.planning`.
"""

from dpops.privacy.accounting import SubsampledGaussian, calibrate_noise, epsilon, pld_epsilon
from dpops.privacy.filters import (
    GRID_FILTER,
    PrivacyFilter,
    calibrate_noise_to_filter,
    choose_filter,
    filter_of_orders,
)
from dpops.privacy.plan import Plan, charge_differences, sample_rate_for

__all__ = [
    "GRID_FILTER",
    "Plan",
    "PrivacyFilter",
    "SubsampledGaussian",
    "calibrate_noise",
    "calibrate_noise_to_filter",
    "charge_differences",
    "choose_filter",
    "epsilon",
    "filter_of_orders",
    "pld_epsilon",
    "sample_rate_for",
]
