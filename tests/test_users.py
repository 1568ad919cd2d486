"""User-level DP: users are Poisson-sampled and each user's summed gradient is clipped once.

The clipping tests run Opacus's own GradSampleModule and DPOptimizer (noise off) and compare with
a hand loop; the end-to-end test runs the real stages on a synthetic user dataset in a DVC repo.
"""

import copy

import pandas as pd
import pytest
import torch
import yaml
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from dpops.assess import canaries
from dpops.config.schema import DatasetConfig
from dpops.data import source as data
from dpops.data import validation
from dpops.errors import DataValidationError
from dpops.ledger.states import COMMITTED
from dpops.ledger.store import Ledger
from dpops.pipeline import stages
from dpops.train import user_level as users
from tests.dvc_repo import make_repo
from tests.helpers import policy_accepting_inconclusive, steward_file

C = 0.5


def _batch(rows_per_user: list[int]):
    torch.manual_seed(1)
    n = sum(rows_per_user)
    x = torch.randn(n, 4) * 5  # large inputs: unclipped gradients are well above C
    y = torch.randint(0, 3, (n,))
    row_user = torch.repeat_interleave(torch.arange(len(rows_per_user)), torch.tensor(rows_per_user))
    return x, y, row_user


def _optimizer_grad(model: nn.Module, x, y, row_user, *, per_user: bool) -> list[torch.Tensor]:
    """p.grad after Opacus clips, sums and scales (noise multiplier 0)."""
    gsm = GradSampleModule(copy.deepcopy(model), batch_first=True, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]
    n_users = int(row_user.max()) + 1
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=C,
                      expected_batch_size=n_users, loss_reduction="mean")
    nn.functional.cross_entropy(gsm(x), y).backward()
    if per_user:
        users.sum_grad_samples_by_user(params, row_user, n_users)
    opt.pre_step()
    return [p.grad.detach().clone() for p in params]


def _hand_loop(model: nn.Module, x, y, row_user) -> list[torch.Tensor]:
    """Clip each user's summed gradient to C, add them up, divide by the number of users."""
    n_users = int(row_user.max()) + 1
    total = [torch.zeros_like(p) for p in model.parameters()]
    for u in range(n_users):
        m = copy.deepcopy(model)
        rows = row_user == u
        nn.functional.cross_entropy(m(x[rows]), y[rows], reduction="sum").backward()
        grads = [p.grad for p in m.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, C / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [t / n_users for t in total]


def test_per_user_clipping_equals_hand_loop_and_differs_from_per_record():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y, row_user = _batch([6, 1, 3, 2])
    expected = _hand_loop(model, x, y, row_user)
    got = _optimizer_grad(model, x, y, row_user, per_user=True)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, atol=1e-6)
    per_record = _optimizer_grad(model, x, y, row_user, per_user=False)
    assert any(not torch.allclose(g, e, atol=1e-4) for g, e in zip(per_record, expected, strict=True))


def test_a_user_with_many_records_contributes_at_most_c():
    model = nn.Sequential(nn.Linear(4, 3))
    x, y, row_user = _batch([40])
    contribution = torch.sqrt(sum((g**2).sum() for g in _optimizer_grad(model, x, y, row_user, per_user=True)))
    assert float(contribution) <= C + 1e-5
    per_record = torch.sqrt(sum((g**2).sum() for g in _optimizer_grad(model, x, y, row_user, per_user=False)))
    assert float(per_record) > 5 * C  # record-level clipping would let this user weigh many times C


def test_user_batches_poisson_sample_whole_users():
    user_ids = [f"u{i % 10}" for i in range(37)]  # 10 users, 3-4 records each, interleaved
    rows = TensorDataset(torch.arange(37))
    loader = users.UserBatches(rows, user_ids, sample_rate=0.3, generator=torch.Generator().manual_seed(0))
    sizes = []
    for _ in range(60):
        for (batch,) in loader:
            got = {user_ids[int(r)] for r in batch}
            assert sorted(batch.tolist()) == sorted(i for i in range(37) if user_ids[i] in got)  # all of each user's rows
            assert loader.batch_users == len(got) and loader.row_user.shape == batch.shape
            sizes.append(len(got))
    assert loader.loader.batch_sampler.sample_rate == 0.3
    assert abs(sum(sizes) / len(sizes) - 3.0) < 0.5  # E[users per batch] = q * n_users
    assert 0 in sizes  # Poisson: empty batches happen and are still steps


def _user_rows(n_users: int, per_user: int) -> list[str]:
    return [f"u{u:02d}\t{(u + k) % 2}\tnote {k} written by person {u} about the visit" for u in range(n_users) for k in range(per_user)]


def _files(rows: list[str]) -> dict[str, str]:
    head = "user\tlabel\ttext\n"
    return {"data/train.tsv": head + "\n".join(rows) + "\n",
            "data/holdout.tsv": head + "\n".join(_user_rows(3, 2)) + "\n",
            "data/eval.tsv": head + "\n".join(_user_rows(4, 2)) + "\n"}


def _dataset(**over) -> dict:
    base = dict(name="notes", files={"train": "data/train.tsv", "holdout": "data/holdout.tsv", "eval": "data/eval.tsv"},
                text_column="text", label_column="label", labels=["0", "1"], unit="user", user_column="user",
                contribution_bound=3, privacy={"epsilon_cap": 20.0, "delta": 1e-3})
    base.update(over)
    return base


def _records(users_and_counts: dict[str, int]) -> pd.DataFrame:
    rows = [(u, f"note {k} by {u}", k % 2) for u, n in users_and_counts.items() for k in range(n)]
    return pd.DataFrame(rows, columns=[data.USER, data.TEXT, data.LABEL])


def test_bound_contributions_keeps_a_uniformly_random_subset_of_at_most_the_bound_per_user():
    df = _records({"many": 5, "few": 2, "one": 1}).sample(frac=1.0, random_state=0)  # users interleaved
    kept_sets = []
    for _ in range(300):
        out = users.bound_contributions(df, 3, users.new_subset_key())
        assert out.groupby(data.USER).size().to_dict() == {"many": 3, "few": 2, "one": 1}  # n users unchanged
        assert set(map(tuple, out.to_numpy())) <= set(map(tuple, df.to_numpy()))
        kept_sets.append(frozenset(out.loc[out[data.USER] == "many", data.TEXT]))
    # every 3 of the 5 records (10 subsets) is drawn, each about 1/10 of the time
    counts = pd.Series(kept_sets).value_counts()
    assert len(counts) == 10 and counts.min() >= 8 and counts.max() <= 60  # Binomial(300, 0.1): mean 30, sd 5.2
    with pytest.raises(ValueError, match="at least 1"):
        users.bound_contributions(df, 0, users.new_subset_key())


def test_bound_contributions_is_1_stable_for_user_level_neighbours():
    """Adding a user (all their records), anywhere in the file, changes no other user's kept records."""
    df = _records({"a": 6, "b": 4, "c": 5})
    neighbour = pd.concat([_records({"new": 7}), df], ignore_index=True)  # the new user's rows come first
    for _ in range(20):
        key = users.new_subset_key()
        kept = users.bound_contributions(df, 2, key)
        kept_neighbour = users.bound_contributions(neighbour, 2, key)
        assert kept_neighbour[kept_neighbour[data.USER] != "new"].reset_index(drop=True).equals(kept)


def test_a_user_above_the_bound_passes_validation_and_only_the_bound_is_trained_on(tmp_path, monkeypatch):
    rows = _user_rows(8, 2) + _user_rows(1, 7)[2:]  # user u00 now has 2 + 5 = 7 records > bound 3
    repo = make_repo(tmp_path / "repo", _files(rows))
    job = _job_files(repo)
    ref = stages.resolve(str(job), str(repo))
    assert (ref["n_records"], ref["n_users"]) == (21, 8)
    assert stages.validate(str(job), ref)["success"]  # no longer refused
    plan = stages.plan(str(job), ref, policy_path=policy_accepting_inconclusive(tmp_path))  # 10 canaries test nothing
    assert plan["n_records"] == 8 + 10  # users (+ canaries): unchanged by the bound
    charge_id = stages.reserve(str(job), ref, plan)
    trained_on = []

    def fake_train(job, plan, df, **kwargs):  # what stages.train hands the trainer
        trained_on.append(df)
        raise RuntimeError("stop here: the records are what this test checks")

    monkeypatch.setattr(stages.training, "train", fake_train)
    with pytest.raises(RuntimeError, match="stop here"):
        stages.train(str(job), ref, plan, charge_id)
    real = trained_on[0][~trained_on[0][data.USER].str.startswith("dpops-canary-")]
    assert real.groupby(data.USER).size().max() == 3 and real[data.USER].nunique() == 8
    assert (real[data.USER] == "u00").sum() == 3 and len(real) == 7 * 2 + 3
    # the subset is drawn afresh: across draws u00's kept records differ
    job_cfg, ds = stages._load(str(job))
    drawn = [frozenset(stages.training_records(job_cfg, ds, ref, plan, canaries.draw(10, n_labels=2, seed=0),
                                               subset_key=users.new_subset_key()).query("user == 'u00'")["text"])
             for _ in range(12)]
    assert len(set(drawn)) > 1 and all(len(d) == 3 for d in drawn)


def test_validation_names_a_missing_user_column_and_repeated_user_records(tmp_path):
    cfg = DatasetConfig(**_dataset())
    rows = _user_rows(4, 2)
    repo = make_repo(tmp_path / "repo", _files(rows[:3] + rows[2:3] + rows[3:]))  # row 4 repeats row 3
    with pytest.raises(DataValidationError, match=r"expect_compound_columns_to_be_unique\. First offending rows") as err:
        validation.validate(data.resolve(cfg, repo=repo), cfg)
    assert "row 4" not in str(err.value)
    assert "expect_compound_columns_to_be_unique: first offending row 4" in steward_file(str(err.value)).read_text()
    no_user = {k: "\n".join(line.split("\t", 1)[1] for line in v.splitlines()) + "\n" for k, v in _files(rows).items()}
    repo = make_repo(tmp_path / "repo2", no_user)
    ref = data.resolve(cfg, repo=repo)
    assert ref.n_users is None
    with pytest.raises(DataValidationError, match=r"expect_column_to_exist\(user\).*the header has 2 field\(s\) separated by '\\t' and no column 'user' \(field 'user_column'\)"):
        validation.validate(ref, cfg)


def _job_files(repo):
    (repo / "configs/datasets").mkdir(parents=True)
    (repo / "configs/jobs").mkdir()
    (repo / "configs/datasets/notes.yaml").write_text(yaml.safe_dump(_dataset()))
    job = repo / "configs/jobs/notes.yaml"
    job.write_text(yaml.safe_dump({
        "name": "notes-user", "dataset": "notes", "registered_model": "notes", "model": {"max_length": 16},
        "dp": {"target_epsilon": 8.0, "expected_batch_size": 6, "steps": 3}, "audit": {"canaries": 10},
    }))
    return job


@pytest.mark.slow
def test_user_level_run_through_the_stages_charges_users(tmp_path, workspace_env):
    repo = make_repo(tmp_path / "repo", _files(_user_rows(24, 3)))
    job = _job_files(repo)
    ref = stages.resolve(str(job), str(repo))
    assert (ref["n_records"], ref["n_users"]) == (72, 24)
    stages.validate(str(job), ref)
    plan = stages.plan(str(job), ref, policy_path=policy_accepting_inconclusive(tmp_path))  # 10 canaries test nothing
    # n counts users, plus the audit's canaries (each a user of its own): 24 + 10.
    assert plan["n_records"] == 34 and plan["sample_rate"] == 1 / 6
    charge_id = stages.reserve(str(job), ref, plan)
    out = stages.train(str(job), ref, plan, charge_id)
    assert out["steps_run"] == 3
    stages.settle(charge_id, out["steps_run"])
    charge = Ledger(f"sqlite:///{workspace_env / 'ledger.db'}").charge(charge_id)
    assert charge.state == COMMITTED and charge.unit == "user" and charge.n_records == 34
