"""Datasets partitioned into blocks (Sage-style), end to end: config, data, plan, reserve, train.

The data is ``tests/fixtures/monthly`` (synthetic tickets, 40 per month), committed into a real
DVC repository month by month as a recurring pipeline would see it arrive; models are the tiny
BERT of ``tests/tiny_models.py``. Its dataset cap (2.25) funds exactly one run of its job per block.
"""

import shutil
from pathlib import Path

import pytest

from dpops.assess import evaluation
from dpops.config.schema import DatasetConfig, DPSettings
from dpops.errors import BudgetExceededError, DataValidationError, LedgerError
from dpops.ledger.states import COMMITTED
from dpops.ledger.store import Ledger
from dpops.pipeline import planning as privacy
from dpops.pipeline import report, stages
from dpops.privacy import filters
from dpops.privacy.plan import Plan
from dpops.train import trainer as training
from tests.dvc_repo import commit, make_repo
from tests.helpers import edit_yaml, steward_file
from tests.tiny_models import tiny_bert

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "monthly"
JAN, FEB = "2026-01", "2026-02"


def _train_tsv(months, extra: tuple[str, ...] = ()) -> str:
    header, *rows = (FIXTURE / "train.tsv").read_text().splitlines()
    return "\n".join([header, *(r for r in rows if r.split("\t")[1] in months), *extra]) + "\n"


def _texts(month: str) -> set[str]:
    return {r.split("\t")[3] for r in (FIXTURE / "train.tsv").read_text().splitlines()[1:] if r.split("\t")[1] == month}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def monthly(tmp_path, tiny_model):
    """A DVC repository holding January's tickets, the fixture's configs beside them; returns
    ``(repo, job path)``."""
    repo = make_repo(tmp_path / "repo", {"data/train.tsv": _train_tsv([JAN]),
                                         "data/holdout.tsv": (FIXTURE / "holdout.tsv").read_text(),
                                         "data/eval.tsv": (FIXTURE / "eval.tsv").read_text()})
    shutil.copytree(FIXTURE / "configs", repo / "configs")
    job = repo / "configs/jobs/monthly_fresh.yaml"
    edit_yaml(job, lambda d: d["model"].update(path=str(tiny_model)))
    return repo, job


def _policy(job: Path) -> str:
    """The fixture's policy: it accepts an INCONCLUSIVE audit (10 canaries cannot test epsilon 2)."""
    return str(job.parent.parent / "policy.yaml")


def _ledger(home: Path) -> Ledger:
    return Ledger(f"sqlite:///{home / 'ledger.db'}")


def _until_reserve(job: Path, repo: Path):
    ref = stages.resolve(str(job), str(repo))
    stages.validate(str(job), ref)
    plan = stages.plan(str(job), ref, policy_path=_policy(job))
    return ref, plan, stages.reserve(str(job), ref, plan)


def _run(job: Path, repo: Path):
    ref, plan, charge_id = _until_reserve(job, repo)
    out = stages.train(str(job), ref, plan, charge_id)
    stages.settle(charge_id, out["steps_run"])
    return ref, plan, charge_id, out


def test_resolve_counts_each_block_in_order_of_arrival(monthly):
    repo, job = monthly
    commit(repo, {"data/train.tsv": _train_tsv([JAN, FEB])}, "February arrives")
    ref = stages.resolve(str(job), str(repo))
    assert ref["blocks"] == {JAN: 40, FEB: 40} and list(ref["blocks"]) == [JAN, FEB] and ref["n_records"] == 80
    # unit 'user': a block counts its users (two tickets each), and so does the plan's n
    edit_yaml(repo / "configs/datasets/monthly.yaml",
          lambda d: d.update(unit="user", user_column="user", contribution_bound=2))
    ref = stages.resolve(str(job), str(repo))
    assert ref["blocks"] == {JAN: 20, FEB: 20} and ref["n_users"] == 40
    stages.validate(str(job), ref)
    plan = stages.plan(str(job), ref, policy_path=_policy(job))
    assert plan["blocks"] == [JAN, FEB] and plan["n_records"] == 40 + 10
    # A value that is not a block name (here free text) never reaches the reference; validation names
    # its column, and its row in the steward-only file.
    commit(repo, {"data/train.tsv": _train_tsv([JAN], extra=("u099\ta secret note\t1\tan odd ticket",))}, "bad")
    ref = stages.resolve(str(job), str(repo))
    assert ref["blocks"] is None and "secret" not in repr(ref)
    with pytest.raises(DataValidationError, match=r"expect_column_values_to_match_regex\(arrival_month\) \(block names") as err:
        stages.validate(str(job), ref)
    assert "row 41" not in str(err.value)
    assert "expect_column_values_to_match_regex(arrival_month): first offending row 41" in steward_file(str(err.value)).read_text()


def test_recurring_fresh_runs_exhaust_a_month_then_train_on_the_new_one_only(monthly, workspace_env, monkeypatch):
    repo, job = monthly
    # Run 1, January only: the charge names January; n = its 40 records + 10 canaries.
    _, plan1, first, _ = _run(job, repo)
    ledger = _ledger(workspace_env)
    assert plan1["blocks"] == [JAN] and plan1["n_records"] == 50 and plan1["sample_rate"] == 1 / 7
    assert ledger.charge(first).blocks == (JAN,) and ledger.charge(first).state == COMMITTED
    [jan] = ledger.budget("monthly").blocks
    assert (jan.name, jan.n_records, jan.epsilon_cap) == (JAN, 40, 2.25)
    # the dataset's filter is the one the first plan chose, now fixed in the ledger
    chosen = Plan(**plan1).filter
    assert ledger.filter_of("monthly") == chosen and len(chosen.orders) == 1 and chosen.delta_shares == (1.0,)
    assert jan.spent == pytest.approx(chosen.epsilon([Plan(**plan1).mechanism], delta=1e-3))

    # Run 2, same data: January cannot take another run, and there is no other block.
    ref = stages.resolve(str(job), str(repo))
    with pytest.raises(BudgetExceededError, match=rf"'monthly': refused. no block can still admit.*'{JAN}' spent 1\.997 of cap 2\.25"):
        stages.plan(str(job), ref, policy_path=_policy(job))
    assert len(ledger.charges("monthly")) == 1 and len(list((workspace_env / "runs").iterdir())) == 1

    # February arrives: the fresh run reads February only.
    commit(repo, {"data/train.tsv": _train_tsv([JAN, FEB])}, "February arrives")
    seen = []
    real_train = training.train

    def spy(job_cfg, plan, df, **kw):
        seen.append(df.copy())
        return real_train(job_cfg, plan, df, **kw)

    monkeypatch.setattr(training, "train", spy)
    ref3, plan3, third, out3 = _run(job, repo)
    assert plan3["blocks"] == [FEB] and plan3["n_records"] == 40 + 10 and plan3["sample_rate"] == 1 / 7
    charge = ledger.charge(third)
    assert charge.blocks == (FEB,) and charge.n_records == 50 and charge.state == COMMITTED
    [df] = seen
    texts = set(df["text"])
    assert _texts(FEB) <= texts and not (texts & _texts(JAN))  # the rest are the included canaries
    assert len(df) - 40 <= 10
    # The audit scores the canaries only, no record of any block; eval needs no block column.
    scored = []
    real_loss = evaluation.per_example_loss
    monkeypatch.setattr(evaluation, "per_example_loss", lambda model, rows, **kw: (scored.append(rows), real_loss(model, rows, **kw))[1])
    stages.audit(str(job), plan3, out3["model_dir"], out3["steps_run"], out3["canaries_path"])
    [rows] = scored
    assert len(rows) == 10 and not set(rows["text"]) & (_texts(JAN) | _texts(FEB))
    assert stages.evaluate(str(job), ref3, out3["model_dir"])["accuracy"] >= 0

    spent = {b.name: (b.n_records, b.spent) for b in ledger.budget("monthly").blocks}
    assert spent[JAN] == (40, pytest.approx(jan.spent)) and spent[FEB] == (40, pytest.approx(jan.spent))
    assert ledger.verify() == []
    table = report.budget_table(ledger.budgets())
    assert f"block {JAN}" in table and f"block {FEB}" in table and "40 records" in table

    # 'all' names every block of this version, so January refuses it at reserve: nothing charged.
    edit_yaml(job, lambda d: d["dp"].update(blocks="all"))
    ref = stages.resolve(str(job), str(repo))
    plan = stages.plan(str(job), ref, policy_path=_policy(job))
    assert plan["blocks"] == [JAN, FEB] and plan["n_records"] == 90
    with pytest.raises(BudgetExceededError, match=rf"block '{JAN}': refused"):
        stages.reserve(str(job), ref, plan)
    assert len(ledger.charges("monthly")) == 2


def test_a_registered_block_that_grew_is_refused_before_any_charge(monthly, workspace_env):
    repo, job = monthly
    _, _, charge_id = _until_reserve(job, repo)  # registers January at 40 records
    ledger = _ledger(workspace_env)
    ledger.release(charge_id, reason="test: never started")
    late = f"u099\t{JAN}\t1\ta late ticket from a new user"
    commit(repo, {"data/train.tsv": _train_tsv([JAN], extra=(late,))}, "a late January arrival")
    ref = stages.resolve(str(job), str(repo))
    stages.validate(str(job), ref)
    with pytest.raises(DataValidationError, match=rf"data/train\.tsv: block '{JAN}' of column 'arrival_month' holds 41 "
                                                  r"records .* registered it with 40.*new block") as err:
        stages.plan(str(job), ref, policy_path=_policy(job))
    assert "late ticket" not in str(err.value)
    with pytest.raises(DataValidationError, match="registered it with 40"):  # reserve re-checks too
        stages.reserve(str(job), ref, {"blocks": [JAN]})
    assert [c.state for c in ledger.charges("monthly")] == ["released"]
    assert [(b.name, b.n_records) for b in ledger.budget("monthly").blocks] == [(JAN, 40)]


def _tickets(cap: float) -> DatasetConfig:
    return DatasetConfig(name="tickets", files={"train": "t", "holdout": "h", "eval": "e"}, text_column="text",
                         label_column="label", labels=["0", "1"], blocks={"column": "month"},
                         privacy={"epsilon_cap": cap, "delta": 1e-5})


def _reserve(ledger: Ledger, mechanism, blocks=None) -> None:
    ledger.reserve(dataset="tickets", mechanism=mechanism, max_grad_norm=1.0, n_records=1000, job="j", data_version="v",
                   blocks=blocks)


def test_fit_to_budget_is_per_block(make_ledger):
    ds = _tickets(cap=3.0)
    ledger = make_ledger(dataset="tickets", unit="record", delta=1e-5, epsilon_cap=3.0)
    for month in ("a", "b"):
        ledger.add_block("tickets", name=month, n_records=1000)
    blocks = [privacy.Block(m, 1000, 3.0, True) for m in ("a", "b")]
    one = privacy.plan_blocks(dataset=ds, dp=DPSettings(target_epsilon=1.0, expected_batch_size=100, steps=50),
                              blocks=blocks[:1], extra_units=0, ledger=ledger, mode="all")
    for _ in range(2):
        _reserve(ledger, one.mechanism, ["a"])

    def fit(max_noise: float) -> DPSettings:
        return DPSettings(target_epsilon=1.0, expected_batch_size=100, steps=50,
                          fit_to_budget={"planned_runs": 5, "max_noise_multiplier": max_noise})

    fitted = privacy.plan_blocks(dataset=ds, dp=fit(10), blocks=blocks, extra_units=0, ledger=ledger, mode="all")
    assert fitted.blocks == ["a", "b"] and fitted.n_records == 2000 and fitted.fitted_runs == 5
    # Fitted to block a, which has spent: five more runs still pass a's filter. The dataset-wide
    # fit (it sees only charges that read the whole dataset: none) would overspend a.
    spent_a = ledger.counted("tickets", "a")
    assert filters.filter_epsilon(spent_a + [fitted.mechanism] * 5, delta=1e-5) <= 3.0
    whole = privacy.plan(dataset=ds, dp=fit(10), n_records=2000, ledger=ledger)
    assert fitted.noise_multiplier > whole.noise_multiplier
    assert filters.filter_epsilon(spent_a + [whole.mechanism] * 5, delta=1e-5) > 3.0

    # Exhaust a: 'all' refuses naming it; 'fresh' trains on b alone, fitted to b.
    while "a" in ledger.fresh_blocks("tickets", one.mechanism):
        _reserve(ledger, one.mechanism, ["a"])
    with pytest.raises(BudgetExceededError, match=r"'tickets' block 'a': refused.*dp\.fit_to_budget\.max_noise_multiplier"):
        privacy.plan_blocks(dataset=ds, dp=fit(5), blocks=blocks, extra_units=0, ledger=ledger, mode="all")
    fresh = privacy.plan_blocks(dataset=ds, dp=fit(5), blocks=blocks, extra_units=0, ledger=ledger, mode="fresh")
    assert fresh.blocks == ["b"] and fresh.n_records == 1000 and fresh.sample_rate == 0.1
    assert filters.filter_epsilon(ledger.counted("tickets", "b") + [fresh.mechanism] * 5, delta=1e-5) <= 3.0


def test_a_block_not_yet_registered_counts_the_charges_that_read_the_whole_dataset(make_ledger):
    """A charge that read the whole dataset (before it had blocks) counts against every block, new ones too."""
    dp = DPSettings(target_epsilon=0.5, expected_batch_size=100, steps=50)
    mechanism = privacy.plan(dataset=_tickets(cap=1.0), dp=dp, n_records=1000).mechanism
    one, two = (filters.filter_epsilon([mechanism] * k, delta=1e-5) for k in (1, 2))
    ds = _tickets(cap=(one + two) / 2)  # one run fits, two do not
    ledger = make_ledger(dataset="tickets", unit="record", delta=1e-5, epsilon_cap=ds.privacy.epsilon_cap)
    new = [privacy.Block("c", 1000, ds.privacy.epsilon_cap, False)]
    p = privacy.plan_blocks(dataset=ds, dp=dp, blocks=new, extra_units=0, ledger=ledger, mode="fresh")
    assert p.blocks == ["c"] and p.mechanism == mechanism
    _reserve(ledger, p.mechanism)  # reads the whole dataset
    with pytest.raises(BudgetExceededError, match="no block can still admit"):
        privacy.plan_blocks(dataset=ds, dp=dp, blocks=new, extra_units=0, ledger=ledger, mode="fresh")
    # and the ledger refuses to partition a dataset whose records were already spent as one (issue 16)
    with pytest.raises(LedgerError, match="already read the whole dataset"):
        ledger.add_block("tickets", name="c", n_records=1000)


# --------------------------------------------------------------------------- the flow (Prefect, MLflow)


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.mark.slow
def test_flow_records_blocks_in_mlflow_and_refuses_when_no_block_is_fresh(prefect_harness, monthly, workspace_env):
    from prefect import get_client

    from flows.private_finetune import private_finetune

    repo, job = monthly
    args = dict(job_path=str(job), policy_path=str(repo / "configs/policy.yaml"), repo=str(repo))
    summary = private_finetune(**args)
    ledger = _ledger(workspace_env)
    [block] = ledger.budget("monthly").blocks
    assert [b["name"] for b in summary["blocks"]] == [JAN] and summary["blocks"][0]["spent"] == pytest.approx(block.spent)
    assert ledger.charge(summary["charge_id"]).blocks == (JAN,)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workspace_env / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["plan.blocks"] == JAN and run.data.params["plan.n_records"] == "50"
    assert run.data.tags["dpops.blocks"] == JAN
    metrics = run.data.metrics
    assert metrics[f"dataset_monthly_block_{JAN}_cumulative_epsilon"] == pytest.approx(block.spent)
    assert metrics[f"dataset_monthly_block_{JAN}_remaining_epsilon"] == pytest.approx(block.remaining)
    assert metrics[f"dataset_monthly_block_{JAN}_read"] == 1.0
    report_json = client.download_artifacts(run.info.run_id, "privacy_report.json", str(workspace_env))
    written = Path(report_json).read_text()
    assert JAN in written and not any(t in written for t in _texts(JAN))  # block names and figures, never a ticket

    # January is spent and nothing else arrived: refused at plan, a clean terminal state.
    state = private_finetune(**args, return_state=True)
    assert state.is_cancelled() and state.name == "Refused"
    assert "no block can still admit" in state.message and "Nothing was trained" in state.message
    with get_client(sync_client=True) as pc:
        [refusal] = [a for a in pc.read_artifacts()
                     if a.flow_run_id == state.state_details.flow_run_id and a.key == "dpops-refusal"]
        assert state.message in refusal.data
    assert ledger.budget("monthly").charges == {"committed": 1}
    assert len(list((workspace_env / "runs").iterdir())) == 1
