"""Audit statistics: known values, and tests that can fail in both directions."""

import numpy as np
import pytest

from dpops import audit
from dpops.accounting import SubsampledGaussian


def test_auc_known_values():
    assert audit.auc([3, 4], [1, 2]) == 1.0
    assert audit.auc([1, 2], [3, 4]) == 0.0
    assert audit.auc([1, 2], [1, 2]) == 0.5
    assert audit.auc([2, 3], [1, 3]) == pytest.approx(0.625)


def test_tpr_at_fpr():
    non = np.arange(100, dtype=float)  # top 1% is {99}
    members = np.array([99.5, 98.5, 50.0, 0.0])
    assert audit.tpr_at_fpr(members, non, 0.01) == 0.5  # 99.5 and 98.5 exceed 98 (the 2nd largest)


def test_lower_bound_near_zero_when_indistinguishable():
    rng = np.random.default_rng(0)
    lb = audit.epsilon_lower_bound(rng.normal(size=1000), rng.normal(size=1000), delta=1e-5)
    assert lb < 0.3


def test_lower_bound_large_when_members_are_separable():
    rng = np.random.default_rng(0)
    lb = audit.epsilon_lower_bound(rng.normal(5, 1, size=1000), rng.normal(0, 1, size=1000), delta=1e-5)
    assert lb > 3.0


def test_audit_fails_a_claim_below_the_lower_bound_and_passes_a_generous_one():
    rng = np.random.default_rng(1)
    members_loss = rng.normal(0.1, 0.05, size=500)  # memorized: low loss
    non_members_loss = rng.normal(1.0, 0.3, size=500)
    tiny = SubsampledGaussian(20.0, 0.01, 10)  # claims a tiny epsilon
    res = audit.run_audit(member_losses=members_loss, non_member_losses=non_members_loss, mechanism=tiny, delta=1e-5)
    assert not res.passed and "lower bound" in res.reasons[0]
    fair = audit.run_audit(member_losses=rng.normal(1, 0.3, 500), non_member_losses=rng.normal(1, 0.3, 500), mechanism=tiny, delta=1e-5)
    assert fair.passed and fair.cross_check_ok


def test_cross_check_agrees_with_dp_accounting():
    ours, theirs = audit.cross_check_epsilon(SubsampledGaussian(0.9, 0.002, 400), delta=1e-6)
    assert ours == pytest.approx(theirs, rel=1e-6)
