"""Audit statistics: known values, and tests that can fail in both directions."""

import numpy as np
import pytest

from dpops.assess import audit, bounds
from dpops.privacy.accounting import SubsampledGaussian


def test_auc_known_values():
    assert bounds.auc([3, 4], [1, 2]) == 1.0
    assert bounds.auc([1, 2], [3, 4]) == 0.0
    assert bounds.auc([1, 2], [1, 2]) == 0.5
    assert bounds.auc([2, 3], [1, 3]) == pytest.approx(0.625)


def test_tpr_at_fpr():
    non = np.arange(100, dtype=float)  # top 1% is {99}
    members = np.array([99.5, 98.5, 50.0, 0.0])
    assert bounds.tpr_at_fpr(members, non, 0.01) == 0.5  # 99.5 and 98.5 exceed 98 (the 2nd largest)


def test_lower_bound_near_zero_when_indistinguishable():
    rng = np.random.default_rng(0)
    lb = bounds.epsilon_lower_bound(rng.normal(size=1000), rng.normal(size=1000), delta=1e-5)
    assert lb < 0.3


def test_lower_bound_large_when_members_are_separable():
    rng = np.random.default_rng(0)
    lb = bounds.epsilon_lower_bound(rng.normal(5, 1, size=1000), rng.normal(0, 1, size=1000), delta=1e-5)
    assert lb > 3.0


def _run(mechanism, *, canary_scores=None, included=None):
    rng = np.random.default_rng(2)
    if canary_scores is None:  # canaries the model did not memorise
        canary_scores, included = rng.normal(size=200), rng.random(200) < 0.5
    return audit.run_audit(canary_scores=canary_scores, canary_included=included, mechanism=mechanism, delta=1e-5)


def test_membership_inference_figures_are_those_of_the_canaries():
    """Members are the included canaries, non-members the others: the released AUC, TPRs and bound
    are exactly the statistics of those two sets (no other score enters)."""
    rng = np.random.default_rng(1)
    included = rng.random(300) < 0.5
    scores = np.where(included, 1.0, 0.0) + rng.normal(0, 0.5, size=300)
    res = _run(SubsampledGaussian(1.0, 0.01, 100), canary_scores=scores, included=included)
    members, non = scores[included], scores[~included]
    assert res.mia_auc == pytest.approx(bounds.auc(members, non)) and res.mia_auc > 0.8
    assert res.mia_tpr_at_1pct_fpr == pytest.approx(bounds.tpr_at_fpr(members, non, 0.01))
    assert res.mia_tpr_at_01pct_fpr == pytest.approx(bounds.tpr_at_fpr(members, non, 0.001))
    assert res.mia_epsilon_lower_bound == pytest.approx(bounds.epsilon_lower_bound(members, non, delta=1e-5))
    assert not {"members", "non_members"} & set(res.to_dict())


def test_the_membership_inference_bound_is_reported_but_never_decides():
    """Its Clopper-Pearson bound treats one model's canaries as independent trials, which they are
    not: the gate may read only bounds valid for one model (the one-run bounds)."""
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    tiny = SubsampledGaussian(20.0, 0.01, 10)  # claims a tiny epsilon
    separated = np.where(included, rng.normal(5, 0.1, 400), rng.normal(0, 1, 400))
    res = _run(tiny, canary_scores=separated, included=included)
    assert res.mia_epsilon_lower_bound > res.claimed_epsilon  # it would have fired before
    assert res.verdict == audit.FAIL and res.decided_by == "black-box canaries"
    assert not any("membership" in r for r in res.reasons)
    fair = _run(tiny, canary_scores=rng.normal(size=400), included=included)
    assert fair.verdict == audit.PASS and fair.passed and fair.cross_check_ok


def test_canaries_all_on_one_side_leave_the_membership_inference_undefined():
    res = _run(SubsampledGaussian(1.0, 0.01, 100), canary_scores=np.linspace(0, 1, 10), included=[True] * 10)
    assert res.mia_auc is None and res.mia_tpr_at_1pct_fpr is None and res.mia_epsilon_lower_bound == 0.0


def test_one_run_bound_matches_the_papers_worked_examples():
    assert bounds.one_run_epsilon_lower_bound(m=1000, r=100, v=75, delta=1e-4) == pytest.approx(0.673, abs=5e-4)
    assert bounds.one_run_epsilon_lower_bound(m=100_000, r=1510, v=1439, delta=1e-5) == pytest.approx(2.675, abs=1e-3)


def test_one_run_bound_keeps_the_delta_term():
    with_delta = bounds.one_run_epsilon_lower_bound(m=100_000, r=1510, v=1439, delta=1e-5)
    without = bounds.one_run_epsilon_lower_bound(m=100_000, r=1510, v=1439, delta=0.0)
    assert without == pytest.approx(2.806, abs=1e-3) and without > with_delta + 0.1  # dropping it is optimistic


def test_one_run_ceiling_with_every_guess_right():
    """All m guesses right at 95%, delta 1e-5: 3.49, 5.78, 7.83 for 100, 1000, 10,000 canaries."""
    for m, ceiling in ((100, 3.49), (1000, 5.78), (10_000, 7.83)):
        assert bounds.one_run_epsilon_lower_bound(m=m, r=m, v=m, delta=1e-5) == pytest.approx(ceiling, abs=0.01)
    # the pre-registered grid costs a little (Bonferroni): the audit's own ceiling is lower
    assert bounds.one_run_ceiling(1000, delta=1e-5) < 5.78


def test_one_run_bound_is_zero_for_chance_guessing_and_rejects_impossible_counts():
    assert bounds.one_run_epsilon_lower_bound(m=1000, r=100, v=50, delta=1e-5) == 0.0
    with pytest.raises(ValueError, match="v=101, r=100"):
        bounds.one_run_p_value(m=1000, r=100, v=101, epsilon=1.0, delta=1e-5)


def test_canary_audit_separates_memorised_from_random_canaries():
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    memorised = audit.canary_audit(np.where(included, 5.0, 0.0) + rng.normal(size=1000), included, delta=1e-5)
    assert memorised.epsilon_lower_bound > 4.0 and memorised.included == int(included.sum())
    chance = audit.canary_audit(rng.normal(size=1000), included, delta=1e-5)
    assert chance.epsilon_lower_bound < 0.5


def test_canary_audit_uses_out_guesses_when_unseen_canaries_often_look_trained_on():
    """Two labels, memorised: trained-on canaries have ~0 loss; unseen ones match their random
    label half the time (also ~0 loss) and miss it otherwise. Only "out" guesses are reliable."""
    rng = np.random.default_rng(4)
    included = rng.random(400) < 0.5
    lucky = rng.random(400) < 0.5
    loss = np.where(included | lucky, rng.uniform(0, 0.05, 400), rng.uniform(2, 5, 400))
    res = audit.canary_audit(-loss, included, delta=1e-6)
    assert res.guesses_in == 0 and res.correct == res.guesses and res.epsilon_lower_bound > 2.0


def test_canary_lower_bound_above_the_claim_fails_and_a_claim_above_the_ceiling_is_inconclusive():
    rng = np.random.default_rng(3)
    included = rng.random(200) < 0.5
    scores = np.where(included, 1.0, -1.0)  # every canary identified
    broken = _run(SubsampledGaussian(20.0, 0.01, 10), canary_scores=scores, included=included)
    assert broken.verdict == audit.FAIL and "canary audit" in broken.reasons[0]
    huge_claim = SubsampledGaussian(0.3, 0.5, 200)  # epsilon far above what 200 canaries can refute
    res = _run(huge_claim, canary_scores=rng.normal(size=200), included=included)
    assert res.verdict == audit.INCONCLUSIVE and not res.passed and "neither confirm nor refute" in res.reasons[0]


def test_cross_check_agrees_with_dp_accounting():
    ours, theirs = bounds.cross_check_epsilon(SubsampledGaussian(0.9, 0.002, 400), delta=1e-6)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_accounting_mismatch_fails_the_audit(monkeypatch):
    """A broken dpops accountant (here: off by 10 %) must fail the audit whatever the attacks say."""
    from dpops.privacy import accounting

    real = accounting.epsilon
    monkeypatch.setattr(accounting, "epsilon", lambda mechs, *, delta: 1.1 * real(mechs, delta=delta))
    res = _run(SubsampledGaussian(0.9, 0.002, 400))
    assert res.verdict == audit.FAIL and not res.cross_check_ok
    assert res.reasons == (f"accounting cross-check mismatch: dpops {res.accountant_epsilon:.6f} (the charge) vs "
                           f"dp_accounting {res.cross_check_epsilon:.6f} (the mechanism the trainer ran)",)
    assert res.decided_by == "accountant cross-check"


def test_the_cross_check_accounts_what_the_trainer_ran_not_the_plan():
    """The trainer's own record of sigma, q and steps is accounted and compared with the charge:
    a trainer that ran another sigma than the one charged fails the audit, even though the plan
    it was handed (and so dpops's figure for the charge) is right."""
    charged = SubsampledGaussian(0.9, 0.002, 400)
    ran = SubsampledGaussian(0.45, 0.002, 400)
    rng = np.random.default_rng(2)
    res = audit.run_audit(canary_scores=rng.normal(size=200), canary_included=rng.random(200) < 0.5, mechanism=charged,
                          delta=1e-5, trained=ran)
    assert res.verdict == audit.FAIL and not res.cross_check_ok and res.decided_by == "accountant cross-check"
    assert res.trained_noise_multiplier == 0.45 and res.claimed_epsilon < res.cross_check_epsilon
    assert any("noise multiplier 0.45 trained, 0.9 charged" in r for r in res.reasons)
    same = audit.run_audit(canary_scores=rng.normal(size=200), canary_included=rng.random(200) < 0.5, mechanism=charged,
                           delta=1e-5, trained=SubsampledGaussian(0.9, 0.002, 400), max_grad_norm=1.0, trained_max_grad_norm=2.0)
    assert same.verdict == audit.FAIL and any("clipping bound 2.0 trained, 1.0 charged" in r for r in same.reasons)


# --------------------------------------------------------------------------- the audit stage: canaries only

#: Every figure the audit stage releases (its result, hence MLflow's ``audit_*`` metrics, the
#: Prefect artifact and the summary table). Each is a figure of the canaries or of the mechanism.
RELEASED = {"claimed_epsilon", "delta", "verdict", "passed", "reasons", "decided_by", "ceiling", "canaries", "canaries_included",
            "canary_guesses", "canary_guesses_in", "canary_correct", "canary_epsilon_lower_bound", "canary_ceiling",
            "canary_all_detected_ceiling", "canary_scoring", "mia_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_01pct_fpr",
            "mia_epsilon_lower_bound", "accountant_epsilon", "cross_check_epsilon", "cross_check_ok", "trained_noise_multiplier",
            "trained_sample_rate", "trained_steps", "white_box_canaries", "white_box_included", "white_box_guesses",
            "white_box_correct", "white_box_epsilon_lower_bound", "white_box_ceiling", "noise_multiplier_upper", "noise_p_value",
            "outcomes", "mechanism"}


def test_the_audit_stage_reads_no_record_and_releases_only_canary_figures(tmp_path, smoke_job, monkeypatch):
    """No split of the dataset is loaded (training or hold-out), only canaries are scored, and
    audit.json / audit.md hold only figures recomputable from the canaries' scores."""
    import json

    import pandas as pd

    from dpops.assess import audit_report, canaries, evaluation
    from dpops.config.schema import LoraSettings, ModelConfig
    from dpops.data import source as data
    from dpops.models import hf as modeling
    from dpops.pipeline import stages
    from tests.tiny_models import tiny_bert

    base = tiny_bert(tmp_path / "base")
    lora = LoraSettings()
    net = modeling.build("classification", "lora", base, n_labels=2, lora=lora)
    model_dir = modeling.save(net, tmp_path / "model", model_cfg=ModelConfig(path=str(base), max_length=16), lora=lora,
                              labels=["0", "1"])
    drawn = canaries.draw(100, n_labels=2, seed=0)
    canaries_path = drawn.save(tmp_path / "run" / canaries.FILE)

    def reads_data(*args, **kwargs):
        raise AssertionError("the audit read a file of the dataset")

    monkeypatch.setattr(data, "load_split", reads_data)
    monkeypatch.setattr(pd, "read_csv", reads_data)
    scored, real_loss = [], evaluation.per_example_loss
    monkeypatch.setattr(evaluation, "per_example_loss",
                        lambda model, rows, **kw: (scored.extend(rows["text"]), real_loss(model, rows, **kw))[1])
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.05, "delta": 1e-5}
    out = stages.audit(str(smoke_job), plan, str(model_dir), 5, str(canaries_path))

    assert sorted(scored) == sorted(drawn.texts)  # every canary once, nothing else
    assert set(out) == RELEASED | {"report_dir"}
    report = json.loads((tmp_path / "run/audit" / audit_report.JSON_FILE).read_text())
    assert set(report) == RELEASED | {"canary_scores", "canary_included", "canary_histogram"}
    scores, inc = np.asarray(report["canary_scores"]), np.asarray(report["canary_included"])
    assert inc.tolist() == drawn.included and sum(report["canary_histogram"]["first"]) == inc.sum()
    assert report["mia_auc"] == pytest.approx(bounds.auc(scores[inc], scores[~inc]))
    assert report["mia_epsilon_lower_bound"] == pytest.approx(bounds.epsilon_lower_bound(scores[inc], scores[~inc], delta=1e-5))
    md = (tmp_path / "run/audit" / audit_report.MARKDOWN_FILE).read_text()
    assert md == audit_report.markdown(out) and "membership inference on the canaries (heuristic, not gating): AUC" in md
    assert "hold-out" not in md and "members (train)" not in md
    assert (tmp_path / "run/audit" / audit_report.PLOT_FILE).stat().st_size > 0


def test_every_project_job_makes_a_claim_its_canaries_can_test(project_root):
    """Under the project policy (no INCONCLUSIVE promoted), plan would refuse a job whose planned
    epsilon is at or above what its canaries can reach at its planned q and steps."""
    import pandas as pd

    from dpops.config import loading as config
    from dpops.pipeline import planning as privacy
    from dpops.pipeline import stages

    for path in sorted((project_root / "configs/jobs").glob("*.yaml")):
        job = config.load_job_config(path)
        ds = config.dataset_config_for(job, path)
        records = len(pd.read_csv(project_root / ds.files.train, sep="\t", usecols=[0], quoting=3))
        n = min(records, job.train_max_records or records) + stages.audit_units(job)
        plan = privacy.plan(dataset=ds, dp=job.dp, n_records=n)
        ceiling, _ = bounds.planned_ceiling(job.audit.canaries, job.audit.gradient_canaries, sample_rate=plan.sample_rate,
                                           steps=plan.steps, delta=ds.privacy.delta)
        assert plan.epsilon < ceiling, (path.name, plan.epsilon, ceiling)


def test_the_removed_real_record_fields_are_refused_naming_them(smoke_job):
    from dpops.config import loading as config
    from dpops.errors import ConfigError
    from tests.helpers import edit_yaml

    edit_yaml(smoke_job, lambda d: d["audit"].update(members=100))
    with pytest.raises(ConfigError, match=r"field 'audit.members' was removed: the audit scores only canaries"):
        config.load_job_config(smoke_job)


def test_input_canaries_are_scored_against_the_model_the_run_started_from(tmp_path, smoke_job):
    """Calibrated scores: loss under the base model (the trainer's initial model, same seed) minus
    loss under the DP model. A model saved untrained is its own base, so every score is exactly 0
    (raw -loss scores, the old ones, are not); a trained head moves them."""
    import json

    import torch

    from dpops.assess import audit_report, canaries, evaluation
    from dpops.config import loading as config
    from dpops.config.schema import LoraSettings, ModelConfig
    from dpops.models import hf as modeling
    from dpops.pipeline import stages
    from tests.tiny_models import tiny_bert

    job = config.load_job_config(smoke_job)
    base = tiny_bert(tmp_path / "base")
    torch.manual_seed(job.seed)  # as the trainer builds its initial model
    net = modeling.build("classification", "lora", base, n_labels=2, lora=LoraSettings())
    untrained = modeling.save(net, tmp_path / "model", model_cfg=ModelConfig(path=str(base), max_length=16), lora=LoraSettings(),
                              labels=["0", "1"])
    drawn = canaries.draw(100, n_labels=2, seed=0)
    canaries_path = drawn.save(tmp_path / "run" / canaries.FILE)
    plan = {"noise_multiplier": 1.0, "sample_rate": 0.05, "delta": 1e-5}
    out = stages.audit(str(smoke_job), plan, str(untrained), 5, str(canaries_path))
    scores = json.loads((tmp_path / "run/audit" / audit_report.JSON_FILE).read_text())["canary_scores"]
    assert out["canary_scoring"].startswith("loss under the base model") and scores == [0.0] * 100
    raw, _ = evaluation.per_example_loss(untrained, drawn.all_rows())
    assert not torch.allclose(raw, torch.zeros_like(raw))
    with torch.no_grad():  # the DP model's head moved: the scores are base minus fine-tuned, canary by canary
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.5)
    moved = modeling.save(net, tmp_path / "moved", model_cfg=ModelConfig(path=str(base), max_length=16), lora=LoraSettings(),
                          labels=["0", "1"])
    stages.audit(str(smoke_job), plan, str(moved), 5, str(canaries_path))
    scores = json.loads((tmp_path / "run/audit" / audit_report.JSON_FILE).read_text())["canary_scores"]
    fine, _ = evaluation.per_example_loss(moved, drawn.all_rows())
    assert scores == pytest.approx((raw - fine).tolist(), abs=1e-5) and any(abs(s) > 1e-3 for s in scores)
