"""White-box gradient canaries: Dirac gradients of norm exactly C added to the DP step before noise.

The trainer must add each included canary exactly once per logical step in which it is
Poisson-sampled (never once per physical piece, never once per process), at exactly C, at its
coordinate, and read that coordinate of every released noisy sum. Most tests run without noise on
a public dataset and with a clipping bound C far above the real gradients' norms: the records then
add less than 0.01 C to any coordinate, so a canary's observation (in units of C) is 1 when it was
added and 0 when not, and anything else (2 for a doubled injection, 4 for one per piece) shows.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dpops.assess import canaries
from dpops.config.schema import AuditSettings, JobConfig
from dpops.errors import TrainingError
from dpops.privacy.plan import Plan
from dpops.train import canary_probe, private_step
from dpops.train import distributed as launch
from dpops.train import trainer as training
from tests.helpers import public_dataset
from tests.tiny_models import tiny_bert

TEXTS = ["a fine film", "dull and slow", "yes", "the cast is superb", "no", "an odd little thing", "sharp", "too long"]
LABELS = [1, 0, 1, 1, 0, 1, 1, 0]
#: Far above the tiny model's per-example gradient norms: the records' sum is below 0.01 C anywhere.
BIG_C = 1e4
#: An observation in units of C is within this of the canaries added there (0 or 1).
TOLERANCE = 0.02


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def _job(base, *, method="lora", **training_settings) -> JobConfig:
    return JobConfig(name="j", dataset="d", registered_model="m", method=method, model={"path": str(base), "max_length": 16},
                     dp={"target_epsilon": 8}, training=training_settings)


def _plan(n: int, *, q: float = 1.0, steps: int = 3, sigma: float = 0.0, clip: float = BIG_C) -> Plan:
    return Plan(dataset="d", n_records=n, sample_rate=q, expected_batch_size=q * n, steps=steps, noise_multiplier=sigma,
                max_grad_norm=clip, delta=1e-3, target_epsilon=8.0, epsilon=8.0)


def _records(copies: int = 1, users: bool = False) -> pd.DataFrame:
    df = pd.DataFrame({"text": TEXTS * copies, "label": LABELS * copies})
    if users:
        df["user"] = [f"u{i % 4}" for i in range(len(df))]  # 4 users of 2 * copies records each
    return df


def _train(base, tmp_path, df, plan, gradient=None, *, method="lora", **training_settings):
    return training.train(_job(base, method=method, **training_settings), plan, df, dataset=public_dataset(), labels=["0", "1"],
                          output_dir=tmp_path / "run" / "model", gradient_canaries=gradient)


def _load(result) -> np.ndarray:
    return np.load(result.gradient_observations)


def _assert_added_once_where_included(obs: np.ndarray, included: list[bool]) -> None:
    """q = 1: every included canary is sampled at every step, so each adds exactly C, once."""
    expected = np.broadcast_to(np.asarray(included, dtype=np.float32), obs.shape)
    assert np.abs(obs - expected).max() < TOLERANCE, obs


# --------------------------------------------------------------------------- drawing


def test_inclusion_is_fresh_randomness_and_the_coordinates_follow_the_seed(tmp_path):
    a, b = canaries.draw_gradient(400, seed=7), canaries.draw_gradient(400, seed=7)
    assert a.count == 400 and a.seed == 7 and a.included != b.included, "inclusion must not come from the seed"
    assert 150 < sum(a.included) < 250  # probability 1/2 each (sd 10)
    assert canaries.GradientCanaries.load(a.save(tmp_path / canaries.GRADIENT_FILE)) == a
    assert canaries.draw_gradient(0, seed=7).included == []

    k = canaries.gradient_coordinates(1000, 300, seed=7)
    assert k.dtype == np.int64 and k.shape == (300,) and len(set(k.tolist())) == 300, "without replacement when m <= d"
    assert k.min() >= 0 and k.max() < 1000
    assert np.array_equal(k, canaries.gradient_coordinates(1000, 300, seed=7))
    assert not np.array_equal(k, canaries.gradient_coordinates(1000, 300, seed=8))
    many = canaries.gradient_coordinates(10, 50, seed=7)
    assert many.shape == (50,) and many.max() < 10  # with replacement when m > d
    with pytest.raises(ValueError):
        canaries.gradient_coordinates(0, 1, seed=7)
    with pytest.raises(ValueError):
        canaries.GradientCanaries(count=2, seed=0, included=[True])


def test_the_config_field_is_bounded_and_off_by_default():
    assert AuditSettings().gradient_canaries == 0
    assert AuditSettings(gradient_canaries=100_000).gradient_canaries == 100_000
    for bad in (-1, 100_001):
        with pytest.raises(ValueError, match="gradient_canaries"):
            AuditSettings(gradient_canaries=bad)
    assert "Dirac" in AuditSettings.model_fields["gradient_canaries"].description


# --------------------------------------------------------------------------- injection and observation


def test_an_included_canary_adds_exactly_c_and_an_excluded_one_nothing(base, tmp_path):
    """At a realistic C (records clipped), against the same run without canaries: same seed, same
    initial weights and, at q = 1, the same batch, so step 1's observations differ by exactly the
    canaries added (later steps differ in the weights the canaries moved)."""
    df, plan = _records(), _plan(8, steps=2, clip=1.0)
    included = [True, False, True, False, True, False]
    with_canaries = _train(base, tmp_path / "a", df, plan, canaries.GradientCanaries(count=6, seed=3, included=included))
    without = _train(base, tmp_path / "b", df, plan, canaries.GradientCanaries(count=6, seed=3, included=[False] * 6))
    shift = _load(with_canaries)[0] - _load(without)[0]
    assert np.abs(shift - np.asarray(included, dtype=np.float32)).max() < 1e-4, shift
    assert np.abs(_load(without)[0]).max() > 1e-3, "the records' own gradient is there too (this test separates it)"


def test_observations_are_float32_steps_by_canaries_beside_the_model(base, tmp_path):
    included = [True, False, True, True, False]
    result = _train(base, tmp_path, _records(), _plan(8, steps=3), canaries.GradientCanaries(count=5, seed=1, included=included))
    path = tmp_path / "run" / training.GRADIENT_OBSERVATIONS
    assert result.gradient_observations == str(path) and path.is_file()
    obs = np.load(path)
    assert obs.dtype == np.float32 and obs.shape == (3, 5)
    _assert_added_once_where_included(obs, included)
    # what ran, read back: here the plan's
    assert (result.noise_multiplier, result.sample_rate, result.max_grad_norm) == (0.0, 1.0, BIG_C)


def test_without_gradient_canaries_nothing_is_observed(base, tmp_path):
    result = _train(base, tmp_path, _records(), _plan(8, steps=1), canaries.GradientCanaries(count=0, seed=0, included=[]))
    assert result.gradient_observations is None and not (tmp_path / "run" / training.GRADIENT_OBSERVATIONS).exists()


@pytest.mark.parametrize("method,mode,pieces", [("lora", "hooks", 2), ("full", "ghost", 3), ("full", "bk", 3)])
def test_one_injection_per_logical_step_in_every_mode_and_in_physical_pieces(base, tmp_path, method, mode, pieces):
    """8 records in pieces of 2 or 3: an injection per piece would read 4 or 3, not 1."""
    included = [True, False, True, True]
    result = _train(base, tmp_path, _records(), _plan(8, steps=2), canaries.GradientCanaries(count=4, seed=5, included=included),
                    method=method, grad_sample_mode=mode, max_physical_batch_size=pieces)
    assert result.grad_sample_mode == mode
    _assert_added_once_where_included(_load(result), included)


def test_user_level_canaries_are_units_like_users(base, tmp_path):
    included = [False, True, True]
    result = _train(base, tmp_path, _records(users=True), _plan(4, steps=2), canaries.GradientCanaries(count=3, seed=2, included=included))
    _assert_added_once_where_included(_load(result), included)
    assert result.sample_rate == 1.0  # the user sampler's rate


def test_canaries_are_poisson_sampled_at_q(base, tmp_path):
    """3000 canaries (2000 included) over 4 steps at q = 0.25: 8000 Bernoulli(q) trials, whose
    fraction has standard deviation 0.005; an excluded canary is never added."""
    included = [True] * 2000 + [False] * 1000
    result = _train(base, tmp_path, _records(), _plan(8, q=0.25, steps=4), canaries.GradientCanaries(count=3000, seed=4, included=included),
                    method="full", grad_sample_mode="ghost")
    obs = _load(result)
    assert obs.shape == (4, 3000)
    assert np.abs(obs - np.round(obs)).max() < TOLERANCE and obs.min() > -TOLERANCE and obs.max() < 1 + TOLERANCE
    sampled = obs > 0.5
    assert not sampled[:, 2000:].any()
    assert abs(sampled[:, :2000].mean() - 0.25) < 0.03, sampled[:, :2000].mean()
    assert 0 < sampled[:, :2000].sum(axis=0).max() <= 4 and len({tuple(row) for row in sampled.T[:2000]}) > 2, "independent draws"


def test_observations_are_in_units_of_c_with_noise_of_sd_sigma(base, tmp_path):
    """With noise sigma C, each observation is N(added, sigma^2) in units of C: 1500 included and
    1500 excluded canaries over 3 steps (sd of the estimates about 0.015)."""
    included = [True, False] * 1500
    result = _train(base, tmp_path, _records(), _plan(8, steps=3, sigma=2.0), canaries.GradientCanaries(count=3000, seed=8, included=included),
                    method="full", grad_sample_mode="bk")
    obs = _load(result).astype(np.float64)
    assert abs(obs[:, 0::2].mean() - 1.0) < 0.2 and abs(obs[:, 1::2].mean()) < 0.2
    assert abs(obs[:, 0::2].std() - 2.0) < 0.1 and abs(obs[:, 1::2].std() - 2.0) < 0.1


def test_the_result_records_the_mechanism_that_ran_not_the_plan(base, tmp_path, monkeypatch):
    """An optimizer and a sampler patched after they were built: the result reports what they ran."""
    make_private, dp_loader = private_step.make_private, training._dp_loader

    def other_optimizer(*args, **kwargs):
        private = make_private(*args, **kwargs)
        private.optimizer.noise_multiplier, private.optimizer.max_grad_norm = 0.7, 2.5
        return private

    def other_sampler(*args, **kwargs):
        loader = dp_loader(*args, **kwargs)
        loader.batch_sampler.sample_rate = 0.5
        return loader

    monkeypatch.setattr(private_step, "make_private", other_optimizer)
    monkeypatch.setattr(training, "_dp_loader", other_sampler)
    result = _train(base, tmp_path, _records(), _plan(8, q=0.25, steps=1, sigma=1.0, clip=1.0))
    assert (result.noise_multiplier, result.sample_rate, result.max_grad_norm) == (0.7, 0.5, 2.5)
    assert result.gradient_observations is None


def test_a_module_clipping_at_another_bound_than_the_noise_is_reported_as_the_effective_mechanism(base, tmp_path, monkeypatch):
    """Ghost clipping clips in the module: clipped at 2 C with noise sigma C, the records get sigma / 2."""
    make_private = private_step.make_private

    def looser_clipping(*args, **kwargs):
        private = make_private(*args, **kwargs)
        private.module.max_grad_norm = 2.0
        return private

    monkeypatch.setattr(private_step, "make_private", looser_clipping)
    result = _train(base, tmp_path, _records(), _plan(8, q=0.25, steps=1, sigma=1.0, clip=1.0), method="full", grad_sample_mode="ghost")
    assert (result.noise_multiplier, result.max_grad_norm) == (0.5, 2.0)


def test_a_missing_observation_fails_the_run(base, tmp_path, monkeypatch):
    monkeypatch.setattr(canary_probe.GradientCanaryProbe, "_observe", lambda self: None)
    with pytest.raises(TrainingError, match="gradient canaries: 2 injections and 0 observations for 2 steps"):
        _train(base, tmp_path, _records(), _plan(8, steps=2), canaries.GradientCanaries(count=2, seed=0, included=[True, True]))


# --------------------------------------------------------------------------- several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, base: str, out: str, mode: str, included: list[bool]) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        result = _train(Path(base), Path(out), _records(), _plan(8, steps=2), canaries.GradientCanaries(count=len(included), seed=6,
                        included=included), method="full", grad_sample_mode=mode, max_physical_batch_size=2)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"observations": result.gradient_observations}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["ghost", pytest.param("hooks", marks=pytest.mark.slow)])
def test_two_processes_add_each_canary_once(base, tmp_path, mode):
    """Rank 0 alone adds the canaries: added on both ranks, the all-reduced sum would read 2."""
    included = [True, False, True]
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(base), str(tmp_path), mode, included), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["observations"] == str(tmp_path / "run" / training.GRADIENT_OBSERVATIONS) and r1["observations"] is None
    _assert_added_once_where_included(np.load(r0["observations"]), included)


def test_torchrun_workers_get_the_gradient_canaries_file(tmp_path, monkeypatch):
    class Failed:
        pid = 0

        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            return 1

    monkeypatch.setattr(launch.subprocess, "Popen", Failed)
    with pytest.raises(TrainingError):
        launch.train_processes(job_path="j.yaml", ref={}, plan={}, charge_id="c", canaries_path=tmp_path / "c.json",
                               run_dir=tmp_path, nproc=2, subset_key=b"k", gradient_canaries_path=str(tmp_path / "g.json"))
    request = json.loads((tmp_path / "launch" / launch.REQUEST).read_text())
    assert request["gradient_canaries_path"] == str(tmp_path / "g.json")


@pytest.mark.slow
def test_torchrun_workers_add_observe_and_report_the_mechanism(workspace_env, smoke_job, project_root, tmp_path):
    """The real torchrun path: the workers load the gradient canaries file; rank 0 saves the
    observations beside the model, and the result carries the mechanism the ranks ran."""
    from dpops.pipeline import stages
    from dpops.train import user_level as users
    from tests.helpers import edit_yaml, policy_accepting_inconclusive

    edit_yaml(smoke_job, lambda d: d.update(
        model={"path": str(tiny_bert(tmp_path / "bert")), "max_length": 16}, training={"nproc_per_node": 2},
        train_max_records=64, dp={**d["dp"], "steps": 3, "expected_batch_size": 16}, audit={"canaries": 10},
    ))
    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref, policy_path=policy_accepting_inconclusive(smoke_job.parent))
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    ledger = stages._ledger()
    try:
        ledger.start(charge_id)
    finally:
        ledger.dispose()
    job, ds = stages._load(str(smoke_job))
    run_dir = workspace_env / "runs" / charge_id
    drawn = canaries.draw(10, n_labels=len(ds.labels), seed=job.seed).save(run_dir / canaries.FILE)
    gradient = canaries.draw_gradient(8, seed=job.seed).save(run_dir / canaries.GRADIENT_FILE)
    out = launch.train_processes(job_path=str(smoke_job), ref=ref, plan=plan, charge_id=charge_id, canaries_path=drawn,
                                 run_dir=run_dir, nproc=2, subset_key=users.new_subset_key(), gradient_canaries_path=str(gradient))
    assert out["gradient_observations"] == str(run_dir / training.GRADIENT_OBSERVATIONS)
    obs = np.load(out["gradient_observations"])
    assert obs.dtype == np.float32 and obs.shape == (3, 8) and np.isfinite(obs).all()
    assert (out["noise_multiplier"], out["sample_rate"], out["max_grad_norm"]) == (
        plan["noise_multiplier"], plan["sample_rate"], plan["max_grad_norm"])
