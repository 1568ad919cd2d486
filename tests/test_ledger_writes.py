"""The ledger's write path against absurd input, on SQLite and PostgreSQL."""

import pytest

from dpops.errors import ConfigError


@pytest.mark.parametrize("cap", [float("inf"), float("nan"), 1e308, 1000.5, 0.0, -1.0])
def test_a_non_finite_or_absurd_cap_does_not_register(make_ledger, ledger_url, cap):
    ledger = make_ledger(ledger_url)
    with pytest.raises(ConfigError, match="privacy.epsilon_cap"):
        ledger.register_dataset(name="notes", unit="record", delta=1e-5, epsilon_cap=cap)
    assert ledger.datasets() == []


@pytest.mark.parametrize("delta", [float("nan"), float("inf"), 0.0, 1.0])
def test_a_delta_outside_zero_one_does_not_register(make_ledger, ledger_url, delta):
    ledger = make_ledger(ledger_url)
    with pytest.raises(ConfigError, match="privacy.delta"):
        ledger.register_dataset(name="notes", unit="record", delta=delta, epsilon_cap=4.0)
    assert ledger.datasets() == []


def test_a_block_never_has_more_budget_than_its_dataset(make_ledger, ledger_url):
    """Issue 16: add_block accepted a cap above the dataset's (and an infinite one)."""
    ledger = make_ledger(ledger_url, dataset="tickets", unit="record", delta=1e-5, epsilon_cap=4.0)
    for cap in (4.5, float("inf"), float("nan"), 0.0):
        with pytest.raises(ConfigError, match="epsilon_cap must be in"):
            ledger.add_block("tickets", name="jan", n_records=1000, epsilon_cap=cap)
    ledger.add_block("tickets", name="jan", n_records=1000, epsilon_cap=4.0)
    ledger.add_block("tickets", name="feb", n_records=1000)
    assert [b.epsilon_cap for b in ledger.budget("tickets").blocks] == [4.0, 4.0]
    assert ledger.verify() == []


def test_a_dataset_with_whole_dataset_spend_cannot_be_partitioned(make_ledger, ledger_url):
    """Issue 16: on the cap-4 SST-2 ledger, blocks added after whole-dataset runs admitted 8 more runs."""
    from dpops.errors import LedgerError
    from dpops.privacy.accounting import SubsampledGaussian

    ledger = make_ledger(ledger_url, dataset="sst2", unit="record", delta=1e-5, epsilon_cap=4.0)
    c = ledger.reserve(dataset="sst2", mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                       n_records=10_000, job="j", data_version="v")
    with pytest.raises(LedgerError, match="already read the whole dataset"):
        ledger.add_block("sst2", name="all", n_records=10_000)
    assert ledger.budget("sst2").blocks == []
    ledger.release(c.id, reason="never started")  # a released charge read nothing: partitioning is then allowed
    ledger.add_block("sst2", name="all", n_records=10_000)
    assert [b.name for b in ledger.budget("sst2").blocks] == ["all"]
