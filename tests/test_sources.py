"""A budget belongs to the data, not to a name: a second dataset on a registered source is refused
unless it is linked (config field ``budget_of``), and then charges the first dataset's budget."""

import shutil

import pytest

from dpops.errors import LedgerError
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from tests.helpers import edit_yaml

TERMS = dict(unit="record", delta=1e-6, epsilon_cap=4.0)


def test_a_second_name_on_a_registered_source_is_refused(ledger_url):
    ledger = Ledger(ledger_url)
    try:
        ledger.register_dataset(name="sst2", source="data/prepared/sst2/train.tsv", **TERMS)
        with pytest.raises(LedgerError) as exc:
            ledger.register_dataset(name="sst2b", source="data/prepared/sst2/train.tsv", **TERMS)
        assert "'sst2'" in str(exc.value) and "'sst2b'" in str(exc.value) and "budget_of" in str(exc.value)
        ledger.register_dataset(name="sst2", source="data/prepared/sst2/train.tsv", **TERMS)  # the same again: no-op
        ledger.register_dataset(name="other", source="data/prepared/other/train.tsv", **TERMS)
        assert ledger.datasets() == ["other", "sst2"]
        # a link must name a registered dataset on the same source
        with pytest.raises(LedgerError, match="not registered"):
            ledger.register_dataset(name="nobody", source="data/prepared/sst2/train.tsv", linked_from="sst2b", **TERMS)
        with pytest.raises(LedgerError, match="budget_of"):
            ledger.register_dataset(name="other", source="data/prepared/sst2/train.tsv", linked_from="sst2b", **TERMS)
        ledger.register_dataset(name="sst2", source="data/prepared/sst2/train.tsv", linked_from="sst2b", **TERMS)
        assert ledger.datasets() == ["other", "sst2"]
        assert ledger.verify() == []
    finally:
        ledger.dispose()


def _copy_dataset(configs, new: str, **fields) -> str:
    """A second dataset config (and smoke job) on sst2's training file, named ``new``."""
    shutil.copy(configs / "datasets" / "sst2.yaml", configs / "datasets" / f"{new}.yaml")
    edit_yaml(configs / "datasets" / f"{new}.yaml", lambda d: d.update(name=new, **fields))
    job = configs / "jobs" / f"{new}_smoke.yaml"
    shutil.copy(configs / "jobs" / "sst2_smoke.yaml", job)
    edit_yaml(job, lambda d: d.update(name=f"{new}-smoke", dataset=new))
    return str(job)


def _until_reserve(job: str, root) -> str:
    ref = stages.resolve(job, str(root))
    return stages.reserve(job, ref, stages.plan(job, ref))


def test_a_copied_config_is_refused_and_a_linked_one_charges_the_first_budget(
    ledger_url, workspace_env, smoke_job, project_root, monkeypatch
):
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    configs = smoke_job.parent.parent
    _until_reserve(str(smoke_job), project_root)
    ledger = Ledger(ledger_url)
    try:
        before = ledger.budget("sst2").remaining
        copied = _copy_dataset(configs, "sst2b")
        with pytest.raises(LedgerError, match="budget_of"):
            _until_reserve(copied, project_root)
        assert ledger.datasets() == ["sst2"] and len(ledger.charges("sst2")) == 1  # nothing registered or charged

        linked = _copy_dataset(configs, "sst2c", budget_of="sst2")
        charge_id = _until_reserve(linked, project_root)
        assert ledger.charge(charge_id).dataset == "sst2"
        assert ledger.datasets() == ["sst2"]
        assert ledger.budget("sst2").remaining < before
    finally:
        ledger.dispose()


def test_a_user_in_one_block_is_refused_in_another_block_of_a_later_version(tmp_path, workspace_env):
    """Version 1 holds January; version 2 drops January and moves one January user into February."""
    from tests.dvc_repo import commit, make_repo
    from tests.test_blocks import FEB, FIXTURE, JAN, _ledger, _policy, _train_tsv
    from tests.test_blocks import _until_reserve as _blocks_until_reserve

    repo = make_repo(tmp_path / "repo", {"data/train.tsv": _train_tsv([JAN]),
                                         "data/holdout.tsv": (FIXTURE / "holdout.tsv").read_text(),
                                         "data/eval.tsv": (FIXTURE / "eval.tsv").read_text()})
    shutil.copytree(FIXTURE / "configs", repo / "configs")
    job = repo / "configs/jobs/monthly_fresh.yaml"
    edit_yaml(repo / "configs/datasets/monthly.yaml",
              lambda d: d.update(unit="user", user_column="user", contribution_bound=2))
    _, _, first = _blocks_until_reserve(job, repo)  # maps January's users to January
    ledger = _ledger(workspace_env)
    try:
        ledger.release(first, reason="test: never started")
        moved = f"u001\t{FEB}\t1\ta ticket from a January user, filed in February"
        commit(repo, {"data/train.tsv": _train_tsv([FEB], extra=(moved,))}, "February, and a January user again")
        ref = stages.resolve(str(job), str(repo))
        stages.validate(str(job), ref)  # within this version the user is in one block only
        with pytest.raises(LedgerError, match=rf"1 user\(s\) of block '{JAN}' now in block '{FEB}'") as err:
            stages.plan(str(job), ref, policy_path=_policy(job))
        assert "u001" not in str(err.value) and "January user" not in str(err.value)
        assert [c.state for c in ledger.charges("monthly")] == ["released"]  # nothing charged

        commit(repo, {"data/train.tsv": _train_tsv([FEB])}, "February's new users only")
        _, plan, second = _blocks_until_reserve(job, repo)
        assert plan["blocks"] == [FEB] and ledger.charge(second).blocks == (FEB,)
    finally:
        ledger.dispose()


@pytest.mark.parametrize("statement", ["UPDATE user_blocks SET block = 'jan'", "DELETE FROM user_blocks"])
def test_reserve_maps_users_once_and_the_map_is_append_only(ledger_url, statement):
    from sqlalchemy import exc, text

    from dpops.privacy.accounting import SubsampledGaussian

    run = SubsampledGaussian(1.0, 0.01, 10)
    ledger = Ledger(ledger_url)
    try:
        ledger.register_dataset(name="notes", unit="user", delta=1e-5, epsilon_cap=50.0, contribution_bound=2)
        for block in ("jan", "feb"):
            ledger.add_block("notes", name=block, n_records=10_000)
        ledger.reserve(dataset="notes", mechanism=run, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v1",
                       blocks=["jan"], user_blocks={"k1": "jan", "k2": "jan"})
        with pytest.raises(LedgerError, match=r"2 user\(s\) of block 'jan' now in block 'feb'"):  # under the lock
            ledger.reserve(dataset="notes", mechanism=run, max_grad_norm=1.0, n_records=10_000, job="j",
                           data_version="v2", blocks=["feb"], user_blocks={"k1": "feb", "k2": "feb", "k3": "feb"})
        assert len(ledger.charges("notes")) == 1
        ledger.reserve(dataset="notes", mechanism=run, max_grad_norm=1.0, n_records=10_000, job="j", data_version="v2",
                       blocks=["feb"], user_blocks={"k3": "feb"})
        with pytest.raises(exc.DatabaseError, match="append-only"):
            with ledger.engine.begin() as conn:
                conn.execute(text(statement))
        with pytest.raises(LedgerError, match="'feb' now in block 'jan'"):
            ledger.check_user_blocks("notes", {"k3": "jan"})
        assert ledger.verify() == []
    finally:
        ledger.dispose()


def test_the_same_data_under_another_name_and_path_is_refused_at_reserve(ledger_url):
    """The source check compares paths; the keyed fingerprint names the bytes: a copy of sst2's
    training file under another path and dataset name is still sst2's records, and sst2's budget."""
    from dpops.privacy.accounting import SubsampledGaussian

    ledger = Ledger(ledger_url)
    version = "hmac-sha256:" + "ab" * 32
    args = dict(mechanism=SubsampledGaussian(1.0, 0.01, 10), max_grad_norm=1.0, n_records=1000, job="j")
    try:
        ledger.register_dataset(name="sst2", source="data/prepared/sst2/train.tsv", **TERMS)
        ledger.register_dataset(name="copy", source="data/elsewhere/train.tsv", **TERMS)
        ledger.reserve(dataset="sst2", data_version=version, **args)
        ledger.reserve(dataset="sst2", data_version=version, **args)  # the same dataset again: its own budget
        with pytest.raises(LedgerError) as exc:
            ledger.reserve(dataset="copy", data_version=version, **args)
        assert "'sst2'" in str(exc.value) and "budget_of: sst2" in str(exc.value) and "ab" * 32 not in str(exc.value)
        assert ledger.charges("copy") == []  # nothing charged
        ledger.reserve(dataset="copy", data_version="hmac-sha256:" + "cd" * 32, **args)  # other bytes: its own budget
        assert len(ledger.charges("copy")) == 1 and ledger.verify() == []
    finally:
        ledger.dispose()
