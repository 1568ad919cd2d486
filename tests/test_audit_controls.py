"""Negative controls of the one-run canary audit, through the real stages (plan, reserve, train
with canaries, audit) on a tiny BERT and a few hundred SST-2 records.

A non-private run and a run with a planted bug (noise ignored) must FAIL with a lower bound far
above the claimed epsilon; a correct DP run must PASS. The bugs are planted by replacing Opacus's
optimizer in the test only, never through a production flag.
"""


import pytest
import yaml
from opacus.optimizers import DPOptimizer

from dpops.assess import audit, bounds
from dpops.pipeline import stages

pytestmark = pytest.mark.slow

CLAIM = 0.5


class _NoiseIgnored(DPOptimizer):
    """The planted bug: clips per-example gradients but adds no noise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "noise_multiplier": 0.0})


class _NonPrivate(DPOptimizer):
    """A plain non-private run: neither noise nor (effective) clipping."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "noise_multiplier": 0.0, "max_grad_norm": 1e6})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 1-layer BERT built from a config (random weights) with MiniLM's tokenizer, saved locally:
    wide enough that a noise-free run memorises canaries in a few full-batch steps; no dropout."""
    from tests.tiny_models import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), hidden_size=256, layers=1, intermediate_size=512)


def _job(configs_dir, tiny_model_dir, *, records: int, dp: dict, audit: dict):
    """The project's sst2 smoke job in a copy of configs/, on the tiny model, with these records, DP and audit settings."""
    job = configs_dir / "jobs" / "sst2_smoke.yaml"
    data = yaml.safe_load(job.read_text())
    data.update(
        train_max_records=records, model={"path": str(tiny_model_dir), "max_length": 16}, dp={**dp, "max_grad_norm": 1.0},
        optim={"learning_rate": 0.005}, audit=audit, lora={"r": 8, "target_modules": ["query", "value"]},
    )
    job.write_text(yaml.safe_dump(data))
    return job


@pytest.fixture
def control_job(configs_dir, tiny_model_dir):
    # q = 1 (expected batch above n): every step sees every record, so memorising is quick. 60 steps:
    # at 40 the noise-ignored run once memorised too few canaries (bound 0.92, 84/100 guesses right)
    # for the 2x margin; at 60 it guessed 40/40 right (bound 1.84) in each of 4 runs.
    return _job(configs_dir, tiny_model_dir, records=100,
                dp={"target_epsilon": CLAIM, "expected_batch_size": 512, "steps": 60}, audit={"canaries": 200})


def _audited_run(job, project_root):
    ref = stages.resolve(str(job), str(project_root))
    plan = stages.plan(str(job), ref)
    charge_id = stages.reserve(str(job), ref, plan)
    trained = stages.train(str(job), ref, plan, charge_id)
    out = stages.audit(str(job), plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"])
    print(f"claimed {out['claimed_epsilon']:.3f}  canary lower bound {out['canary_epsilon_lower_bound']:.3f} "
          f"({out['canary_correct']}/{out['canary_guesses']})  canary MIA AUC {out['mia_auc']}  verdict {out['verdict']}")
    return plan, out


@pytest.mark.parametrize("optimizer", [_NoiseIgnored, _NonPrivate], ids=["noise-ignored", "non-private"])
def test_broken_runs_fail_with_a_large_lower_bound(workspace_env, control_job, project_root, monkeypatch, optimizer):
    monkeypatch.setattr("opacus.optimizers.DPOptimizer", optimizer)
    plan, out = _audited_run(control_job, project_root)
    assert plan["n_records"] == 100 + 200 and plan["sample_rate"] == 1.0  # the canaries are counted in n
    assert out["claimed_epsilon"] == pytest.approx(plan["epsilon"], rel=1e-6) and out["claimed_epsilon"] <= CLAIM
    assert out["verdict"] == audit.FAIL and not out["passed"]
    assert out["canary_epsilon_lower_bound"] > 2 * out["claimed_epsilon"]
    assert "canary audit" in out["reasons"][0]


def test_correct_dp_run_passes(workspace_env, control_job, project_root):
    _, out = _audited_run(control_job, project_root)
    assert out["verdict"] == audit.PASS and out["passed"], out["reasons"]
    assert out["canary_epsilon_lower_bound"] <= out["claimed_epsilon"] < out["canary_ceiling"]


# --------------------------------------------------------------------------- white-box canaries at small q

SMALL_Q_CLAIM = 1.0


@pytest.fixture
def small_q_job(configs_dir, tiny_model_dir):
    """q = 1 / ceil(2400 / 24) = 0.01 over 60 steps: an included canary is ever sampled with
    probability 0.45, far from q = 1, where every included canary is seen."""
    return _job(configs_dir, tiny_model_dir, records=300,
                dp={"target_epsilon": SMALL_Q_CLAIM, "expected_batch_size": 24, "steps": 60},
                audit={"canaries": 100, "gradient_canaries": 2000})


def _white_box_run(job, project_root):
    ref = stages.resolve(str(job), str(project_root))
    plan = stages.plan(str(job), ref)  # the default policy: refuses a claim the canaries cannot test
    charge_id = stages.reserve(str(job), ref, plan)
    trained = stages.train(str(job), ref, plan, charge_id)
    out = stages.audit(str(job), plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"],
                       trained=trained, charge_id=charge_id)
    return plan, out


def test_a_noise_free_run_at_small_q_fails_on_the_white_box_canaries(workspace_env, small_q_job, project_root, monkeypatch):
    """The bug is planted inside Opacus's noise generator: the optimizer still reports the planned
    sigma, so the trainer's record and the cross-check cannot see it; the gradient canaries do."""
    import opacus.optimizers.optimizer as opt

    monkeypatch.setattr(opt, "_generate_noise", lambda std, reference, *a, **k: reference.new_zeros(reference.shape))
    plan, out = _white_box_run(small_q_job, project_root)
    assert plan["sample_rate"] == 0.01 and plan["n_records"] == 300 + 100 + 2000
    assert out["trained_noise_multiplier"] == plan["noise_multiplier"] and out["cross_check_ok"]
    assert out["verdict"] == audit.FAIL and out["decided_by"] == "white-box noise check"
    assert out["white_box_epsilon_lower_bound"] > out["claimed_epsilon"]  # the one-run bound alone refutes it too
    assert out["noise_multiplier_upper"] < 0.2 * plan["noise_multiplier"]


def test_a_correct_run_at_small_q_passes(workspace_env, small_q_job, project_root):
    import json
    from pathlib import Path

    plan, out = _white_box_run(small_q_job, project_root)
    assert out["verdict"] == audit.PASS, out["reasons"]
    assert out["decided_by"] == "white-box canaries" and out["white_box_ceiling"] > out["claimed_epsilon"]
    assert out["noise_multiplier_upper"] >= plan["noise_multiplier"]
    # audit.json lets anyone recompute the white-box bound from the gradient canaries' scores
    report = json.loads((Path(out["report_dir"]) / "audit.json").read_text())
    again = audit.canary_audit(report["white_box_scores"], report["white_box_included"], delta=plan["delta"],
                               confidence=1 - bounds.FALSE_ALARM / 3, sample_rate=plan["sample_rate"], steps=plan["steps"],
                               white_box=True)
    assert again.epsilon_lower_bound == out["white_box_epsilon_lower_bound"] and again.correct == out["white_box_correct"]
