"""Accounting: dpops's epsilon equals Opacus's and Google's dp_accounting RDP accountants."""

import math

import dp_accounting
import pytest
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant

from dpops.privacy import accounting, filters
from dpops.privacy.accounting import SubsampledGaussian

CASES = [
    # sigma, q, steps, delta
    (1.0, 0.01, 1000, 1e-5),
    (0.8, 0.004, 3000, 1e-6),
    (2.5, 0.1, 200, 1e-5),
    (0.6, 0.0019, 150, 1e-6),
    (5.0, 1.0, 10, 1e-5),
]


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_epsilon_matches_opacus_rdp_accountant_and_is_never_below_it(sigma, q, steps, delta):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    theirs = acc.get_epsilon(delta=delta)
    ours = accounting.epsilon([SubsampledGaussian(sigma, q, steps)], delta=delta)
    # Opacus's fractional-order RDP is slightly lower than dp_accounting's; dpops keeps the larger.
    assert ours >= theirs * (1 - 1e-12)
    assert ours == pytest.approx(theirs, rel=1e-5)


@pytest.mark.parametrize("sigma,q,steps,delta", CASES)
def test_epsilon_equals_dp_accounting_rdp(sigma, q, steps, delta):
    acc = RdpAccountant(orders=list(accounting.RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    ours = accounting.epsilon([SubsampledGaussian(sigma, q, steps)], delta=delta)
    assert ours == pytest.approx(acc.get_epsilon(delta), rel=1e-6)


def test_composition_of_several_events_equals_dp_accounting():
    events = [SubsampledGaussian(1.0, 0.01, 500), SubsampledGaussian(0.7, 0.02, 300), SubsampledGaussian(1.0, 0.01, 500)]
    acc = RdpAccountant(orders=list(accounting.RDP_ORDERS))
    for e in events:
        acc.compose(dp_accounting.PoissonSampledDpEvent(e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)), e.steps)
    assert accounting.epsilon(events, delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)


def test_composed_epsilon_is_not_the_sum_of_run_epsilons():
    run = SubsampledGaussian(1.0, 0.01, 500)
    single = accounting.epsilon([run], delta=1e-5)
    double = accounting.epsilon([run, run], delta=1e-5)
    assert single < double < 2 * single


def test_calibrate_noise_meets_target_from_below():
    for target in (0.5, 1.0, 3.0, 8.0):
        sigma = accounting.calibrate_noise(target_epsilon=target, sample_rate=0.01, steps=300, delta=1e-5)
        eps = accounting.epsilon([SubsampledGaussian(sigma, 0.01, 300)], delta=1e-5)
        assert eps <= target
        # and it is not needlessly noisy: a slightly smaller sigma exceeds the target
        assert accounting.epsilon([SubsampledGaussian(sigma - 0.02, 0.01, 300)], delta=1e-5) > target


def test_filter_epsilon_is_conservative_and_monotone():
    run = SubsampledGaussian(1.0, 0.01, 500)
    assert filters.filter_epsilon([run], delta=1e-5) >= accounting.epsilon([run], delta=1e-5)
    a = filters.filter_epsilon([run], delta=1e-5)
    b = filters.filter_epsilon([run, run], delta=1e-5)
    assert b > a


def test_filter_admits_up_to_cap_only():
    run = SubsampledGaussian(1.0, 0.01, 500)
    cap = filters.filter_epsilon([run, run], delta=1e-5)
    assert filters.filter_admits([run], run, delta=1e-5, cap=cap)
    assert not filters.filter_admits([run, run], run, delta=1e-5, cap=cap)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(noise_multiplier=0.0, sample_rate=0.1, steps=1), "noise_multiplier"),
        (dict(noise_multiplier=1.0, sample_rate=1.5, steps=1), "sample_rate"),
        (dict(noise_multiplier=1.0, sample_rate=0.1, steps=-1), "steps"),
        (dict(noise_multiplier=math.inf, sample_rate=0.1, steps=1), "noise_multiplier"),
    ],
)
def test_bad_parameters_name_the_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SubsampledGaussian(**kwargs)


def test_bad_delta_is_refused():
    with pytest.raises(ValueError, match="delta"):
        accounting.epsilon([SubsampledGaussian(1.0, 0.1, 10)], delta=1.0)


def test_noise_fitted_to_the_filter_admits_exactly_the_planned_runs():
    spent = [SubsampledGaussian(0.8, 0.01, 700)]
    cap, delta, q, steps = 6.0, 1e-5, 0.01, 400
    sigma = filters.calibrate_noise_to_filter(spent=spent, cap=cap, runs=3, sample_rate=q, steps=steps, delta=delta)
    run = SubsampledGaussian(sigma, q, steps)
    assert filters.filter_epsilon(spent + [run] * 3, delta=delta) <= cap
    # Minimal up to the bisection tolerance: a bit less noise would not fit the three runs.
    less = SubsampledGaussian(sigma - 0.02, q, steps)
    assert filters.filter_epsilon(spent + [less] * 3, delta=delta) > cap
    # More planned runs need more noise; a spent budget cannot be fitted at all.
    assert filters.calibrate_noise_to_filter(spent=spent, cap=cap, runs=6, sample_rate=q, steps=steps, delta=delta) > sigma
    with pytest.raises(ValueError, match="no noise multiplier"):
        filters.calibrate_noise_to_filter(spent=spent * 40, cap=cap, runs=1, sample_rate=q, steps=steps, delta=delta)
