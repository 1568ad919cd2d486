"""The ledger's write path against absurd input, on SQLite and PostgreSQL."""

import pytest

from dpops.errors import ConfigError
from dpops.ledger import Ledger


@pytest.mark.parametrize("cap", [float("inf"), float("nan"), 1e308, 1000.5, 0.0, -1.0])
def test_a_non_finite_or_absurd_cap_does_not_register(ledger_url, cap):
    ledger = Ledger(ledger_url)
    with pytest.raises(ConfigError, match="privacy.epsilon_cap"):
        ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=cap)
    assert ledger.datasets() == []


@pytest.mark.parametrize("delta", [float("nan"), float("inf"), 0.0, 1.0])
def test_a_delta_outside_zero_one_does_not_register(ledger_url, delta):
    ledger = Ledger(ledger_url)
    with pytest.raises(ConfigError, match="privacy.delta"):
        ledger.register_dataset(name="notes", unit="record", delta=delta, epsilon_cap=4.0)
    assert ledger.datasets() == []
