"""The gate reads the ledger, names every failed condition, and records every decision.

A real SQLite ledger and a real SQLite-backed MLflow registry in tmp; no training (the model
version points at an empty artifact directory: the gate never loads the model). The gate's
evidence is written once (``model_bound``, ``evidence``) on both backends.
"""

import itertools
import json

import pytest
from typer.testing import CliRunner

from dpops.cli.app import app
from dpops.config.policy import PolicyConfig
from dpops.errors import LedgerError
from dpops.ledger.store import Ledger
from dpops.privacy.accounting import SubsampledGaussian
from dpops.registry import gate
from tests.helpers import policy_accepting_inconclusive, tamper

POLICY = PolicyConfig(min_accuracy=0.7)
GOOD_AUDIT = {"verdict": "PASS", "reasons": [], "claimed_epsilon": 1.0, "canary_epsilon_lower_bound": 0.1,
              "canary_ceiling": 3.0, "mia_epsilon_lower_bound": 0.0, "cross_check_ok": True}
SHA = "ab" * 32
runner = CliRunner()
_versions = itertools.count(100)  # model versions no test binds twice


def _charge(ledger: Ledger, *, commit=True, model="auto", accuracy=0.8, audit=GOOD_AUDIT, cap=8.0, dataset="notes",
            task="classification", **figures) -> str:
    """A charge recorded as the record stage records one: bound to ``model`` ("name/version"; "auto":
    a fresh version of 'm'; None: not bound), then its evidence (none when ``audit`` is None)."""
    ledger.register_dataset(name=dataset, unit="record", delta=1e-6, epsilon_cap=cap)
    c = ledger.reserve(dataset=dataset, mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                       n_records=50_000, job="j", data_version="sha256:x")
    ledger.start(c.id)
    if commit:
        ledger.commit(c.id, steps_run=100)
    if model == "auto":
        model = f"m/{next(_versions)}"
    if model is not None:
        name, version = model.split("/")
        ledger.bind_model(c.id, model_name=name, model_version=version, mlflow_run_id="run-" + c.id[:8], artifact_sha256=SHA)
        if audit is not None:
            figures = {k: v for k, v in {"accuracy": accuracy, **figures}.items() if v is not None}
            ledger.record_evidence(c.id, task=task, figures=figures, audit=audit)
    return c.id


def _model(ledger: Ledger, charge_id: str) -> str:
    return gate.evidence(ledger, charge_id).model


@pytest.fixture
def ledger(make_ledger):
    """An empty SQLite ledger: ``_charge`` registers each test's datasets (overrides the shared ``ledger``)."""
    return make_ledger()


def test_promotes_when_every_condition_holds(ledger):
    charge_id = _charge(ledger, model="m/1")
    decision = gate.decide(ledger, charge_id=charge_id, policy=POLICY, model="m/1")
    assert decision.promote and decision.reasons == [] and decision.label == "PROMOTED"


def test_refusal_names_every_failed_condition(ledger):
    failed_audit = {**GOOD_AUDIT, "verdict": "FAIL", "reasons": ["canary audit: epsilon lower bound 4.1 exceeds 1.0"]}
    charge_id = _charge(ledger, commit=False, model="m/2", accuracy=0.5, audit=failed_audit)
    decision = gate.decide(ledger, charge_id=charge_id, policy=POLICY, model="m/1")
    assert not decision.promote and len(decision.reasons) == 4, decision.reasons
    text_ = " | ".join(decision.reasons)
    for expected in ("recorded for model 'm/2', not 'm/1'", "is 'running', not committed",
                     "audit verdict FAIL: canary audit: epsilon lower bound 4.1", "accuracy 0.5000 < policy min_accuracy 0.7"):
        assert expected in text_


def test_inconclusive_audit_and_missing_evidence_refuse(ledger):
    inconclusive = _charge(ledger, audit={**GOOD_AUDIT, "verdict": "INCONCLUSIVE"})
    assert gate.decide(ledger, charge_id=inconclusive, policy=POLICY).reasons == ["audit verdict INCONCLUSIVE"]
    bare = _charge(ledger, model=None)
    assert gate.decide(ledger, charge_id=bare, policy=POLICY, model="m/1").reasons == [
        f"charge {bare} is bound to no model in the ledger, not 'm/1'",
        f"charge {bare} has no evidence in the ledger (no task, utility figures or audit verdict recorded)"]
    no_evidence = _charge(ledger, model="m/3", audit=None)
    assert gate.decide(ledger, charge_id=no_evidence, policy=POLICY, model="m/3").reasons == [
        f"charge {no_evidence} has no evidence in the ledger (no task, utility figures or audit verdict recorded)"]
    no_accuracy = _charge(ledger, accuracy=None)
    assert gate.decide(ledger, charge_id=no_accuracy, policy=POLICY).reasons == ["no accuracy is recorded in the ledger for this charge"]


def test_an_inconclusive_audit_promotes_only_when_the_policy_accepts_it(ledger):
    accepting = PolicyConfig(min_accuracy=0.7, accept_inconclusive=True)
    inconclusive = _charge(ledger, audit={**GOOD_AUDIT, "verdict": "INCONCLUSIVE", "reasons": ["claimed epsilon 4 is at or above"]})
    assert gate.decide(ledger, charge_id=inconclusive, policy=POLICY).reasons == [
        "audit verdict INCONCLUSIVE: claimed epsilon 4 is at or above"]
    assert gate.decide(ledger, charge_id=inconclusive, policy=accepting).promote
    failed = _charge(ledger, audit={**GOOD_AUDIT, "verdict": "FAIL", "reasons": ["canary audit: bound 4.1"]})
    assert gate.decide(ledger, charge_id=failed, policy=accepting).reasons == ["audit verdict FAIL: canary audit: bound 4.1"]


def test_the_default_and_the_project_policy_refuse_an_inconclusive_audit(project_root):
    from dpops.config import loading as config

    assert not PolicyConfig().accept_inconclusive
    assert not config.load_policy(project_root / "configs/policy.yaml").accept_inconclusive


def test_an_edited_ledger_refuses(ledger):
    charge_id = _charge(ledger)
    tamper(ledger, "UPDATE charges SET noise_multiplier = 5.0")
    reasons = gate.decide(ledger, charge_id=charge_id, policy=POLICY).reasons
    assert len(reasons) == 1 and reasons[0].startswith("ledger does not verify") and "edited" in reasons[0]


def _register_version(tracking_uri, tmp_path, charge_id=None) -> str:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    if not client.search_registered_models("name='m'"):
        client.create_registered_model("m")
    (tmp_path / "artifacts").mkdir(exist_ok=True)
    version = client.create_model_version("m", source=(tmp_path / "artifacts").as_uri())
    if charge_id:
        client.set_model_version_tag("m", version.version, "dpops.charge_id", charge_id)
    return str(version.version)


def test_cli_promote_rechecks_the_ledger_and_records_every_decision(workspace_env, workspace_ledger, tmp_path, project_root):
    import mlflow

    workspace_env.mkdir(parents=True)
    ledger = workspace_ledger()
    uri = f"sqlite:///{workspace_env / 'mlflow.db'}"
    policy = str(project_root / "configs/policy.yaml")
    client = mlflow.MlflowClient(tracking_uri=uri)

    bad = _charge(ledger, model="m/1", accuracy=0.5)
    v1 = _register_version(uri, tmp_path, bad)
    refused = runner.invoke(app, ["promote", "m", v1, "--policy", policy])
    assert refused.exit_code == 1 and "m/1: refused" in refused.output and "accuracy 0.5000 < policy" in refused.output
    assert client.get_model_version("m", v1).tags["dpops.gate"] == "REFUSED"
    assert "production" not in client.get_registered_model("m").aliases

    good = _charge(ledger, model="m/2")
    v2 = _register_version(uri, tmp_path, good)
    promoted = runner.invoke(app, ["promote", "m", v2, "--policy", policy, "--alias", "production"])
    assert promoted.exit_code == 0, promoted.output
    assert str(client.get_model_version_by_alias("m", "production").version) == v2
    assert client.get_model_version("m", v2).tags["dpops.gate"] == "PROMOTED"

    # a version whose tag points at another model's charge is refused: the ledger names the model
    v3 = _register_version(uri, tmp_path, good)
    mismatch = runner.invoke(app, ["promote", "m", v3, "--policy", policy])
    assert mismatch.exit_code == 1 and f"recorded for model 'm/2', not 'm/{v3}'" in mismatch.output
    untagged = runner.invoke(app, ["promote", "m", _register_version(uri, tmp_path), "--policy", policy])
    assert untagged.exit_code == 1 and "no 'dpops.charge_id' tag" in untagged.output

    decisions = [e["payload"] for e in ledger.history("notes") if e["event"] == "gate_decision"]
    assert [(d["model"], d["decision"]) for d in decisions] == [("m/1", "REFUSED"), ("m/2", "PROMOTED"), (f"m/{v3}", "REFUSED")]
    assert json.loads(client.get_model_version("m", v1).tags["dpops.gate_reasons"]) == decisions[0]["reasons"]
    assert ledger.verify() == []


# --------------------------------------------------------------------------- evidence written once (both backends)


def _workspace_ledger(workspace_env, monkeypatch, ledger_url) -> Ledger:
    """The workspace's ledger (what `dpops promote` opens) on ``ledger_url``'s backend."""
    workspace_env.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DPOPS_LEDGER_URL", ledger_url)
    return Ledger(ledger_url)


def test_annotate_cannot_re_point_a_charge_at_an_unaccounted_model(ledger_url, workspace_env, monkeypatch, tmp_path, project_root):
    """The issue's first API attack: the old code let a later `annotated` note win, so
    ``annotate(charge, model="m/2")`` made `dpops promote m 2` PROMOTE a version no charge paid for."""
    ledger = _workspace_ledger(workspace_env, monkeypatch, ledger_url)
    uri = f"sqlite:///{workspace_env / 'mlflow.db'}"
    policy = str(project_root / "configs/policy.yaml")
    good = _charge(ledger, model="m/1")
    assert _register_version(uri, tmp_path, good) == "1"
    unaccounted = _register_version(uri, tmp_path, good)  # e.g. trained without DP, tagged with a good charge's id
    with pytest.raises(LedgerError, match=r"annotate cannot write \['model'\]"):
        ledger.annotate(good, model=f"m/{unaccounted}")
    with pytest.raises(LedgerError, match="already bound to model m/1"):
        ledger.bind_model(good, model_name="m", model_version=unaccounted, mlflow_run_id="r", artifact_sha256=SHA)
    refused = runner.invoke(app, ["promote", "m", unaccounted, "--policy", policy])
    assert refused.exit_code == 1 and f"recorded for model 'm/1', not 'm/{unaccounted}'" in refused.output, refused.output
    assert runner.invoke(app, ["promote", "m", "1", "--policy", policy]).exit_code == 0  # the bound version still promotes
    import mlflow

    assert str(mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias("m", "production").version) == "1"


def test_annotate_cannot_forge_a_refused_models_accuracy(ledger_url, workspace_env, monkeypatch, tmp_path, project_root):
    """The issue's second API attack: ``annotate(charge, accuracy=0.99)`` on a model the gate
    refused at 0.5 made `dpops promote` PROMOTE it on the old code."""
    ledger = _workspace_ledger(workspace_env, monkeypatch, ledger_url)
    uri = f"sqlite:///{workspace_env / 'mlflow.db'}"
    policy = str(project_root / "configs/policy.yaml")
    bad = _charge(ledger, model="m/1", accuracy=0.5)
    version = _register_version(uri, tmp_path, bad)
    first = runner.invoke(app, ["promote", "m", version, "--policy", policy])
    assert first.exit_code == 1 and "accuracy 0.5000 < policy" in first.output
    with pytest.raises(LedgerError, match=r"annotate cannot write \['accuracy', 'audit'\]"):
        ledger.annotate(bad, accuracy=0.99, audit=GOOD_AUDIT)
    with pytest.raises(LedgerError, match="evidence is already recorded"):
        ledger.record_evidence(bad, task="classification", figures={"accuracy": 0.99}, audit=GOOD_AUDIT)
    again = runner.invoke(app, ["promote", "m", version, "--policy", policy])
    assert again.exit_code == 1 and "accuracy 0.5000 < policy" in again.output, again.output
    assert ledger.verify() == []


def test_a_binding_and_evidence_are_written_once_and_a_version_has_one_charge(make_ledger, ledger_url):
    ledger = make_ledger(ledger_url)
    a = _charge(ledger, model="m/1")
    assert ledger.charge(a).mlflow_run_id == "run-" + a[:8]  # from the binding
    with pytest.raises(LedgerError, match=f"charge {a} is already bound to model m/1; a binding is written once"):
        ledger.bind_model(a, model_name="m", model_version="1", mlflow_run_id="r", artifact_sha256=SHA)
    other = _charge(ledger, dataset="other", model=None)  # another dataset: the check spans the whole ledger
    with pytest.raises(LedgerError, match=f"model m/1 is already bound to charge {a}; a model version is bound to one charge"):
        ledger.bind_model(other, model_name="m", model_version=1, mlflow_run_id="r", artifact_sha256=SHA)
    with pytest.raises(LedgerError, match="bind_model comes before its evidence"):
        ledger.record_evidence(other, task="classification", figures={"accuracy": 0.9}, audit=GOOD_AUDIT)
    for bad, field_ in (({"artifact_sha256": "AB" * 32}, "artifact_sha256"), ({"model_version": "latest"}, "model_version"),
                        ({"model_name": ""}, "model_name"), ({"mlflow_run_id": ""}, "mlflow_run_id")):
        fields = {"model_name": "m", "model_version": "2", "mlflow_run_id": "r", "artifact_sha256": SHA, **bad}
        with pytest.raises(LedgerError, match=f"field '{field_}'"):
            ledger.bind_model(other, **fields)
    ledger.bind_model(other, model_name="m", model_version="2", mlflow_run_id="r", artifact_sha256=SHA)
    with pytest.raises(LedgerError, match=r"figures \['loss'\] are not among"):
        ledger.record_evidence(other, task="classification", figures={"loss": 0.1}, audit=GOOD_AUDIT)
    ledger.record_evidence(other, task="classification", figures={"accuracy": 0.9}, audit=GOOD_AUDIT)
    with pytest.raises(LedgerError, match="evidence is already recorded"):
        ledger.record_evidence(other, task="classification", figures={"accuracy": 0.99}, audit=GOOD_AUDIT)
    assert [b[:2] for b in ledger.bindings_of("m", "1")] == [(a, "notes")] and ledger.bindings_of("m", "3") == []
    assert [e["event"] for e in ledger.history("other")][-2:] == ["model_bound", "evidence"]
    ledger.annotate(a, note="free-form lineage is still appended")
    assert gate.decide(ledger, charge_id=a, policy=POLICY, model="m/1").promote
    assert ledger.verify() == []


def test_a_charge_with_only_old_annotated_notes_is_refused(ledger):
    """A ledger written before evidence was recorded once: the gate refuses, saying why, and reads none of the notes."""
    charge_id = _charge(ledger, model=None)
    with ledger.engine.begin() as conn:  # what the old record stage appended (a valid event of the chain)
        ds = ledger._lock_dataset(conn, "notes")
        ledger._append(conn, ds, "annotated", charge_id,
                       {"model": "m/1", "mlflow_run_id": "r", "task": "classification", "accuracy": 0.9, "audit": GOOD_AUDIT})
    assert ledger.verify() == []
    reasons = gate.decide(ledger, charge_id=charge_id, policy=POLICY, model="m/1").reasons
    assert reasons == [f"charge {charge_id}: {gate.LEGACY_EVIDENCE}"]


def test_the_gate_compares_a_partitioned_dataset_block_by_block(make_ledger, ledger_url):
    """A block over its own cap refuses, by name, though the largest spend is below the largest cap
    (the old check, max spent against max cap, promoted)."""
    ledger = make_ledger(ledger_url, dataset="monthly", unit="record", delta=1e-6, epsilon_cap=8.0)
    for block in ("jan", "feb"):
        ledger.add_block("monthly", name=block, n_records=30_000, epsilon_cap=8.0)
    charges = {}
    for version, block in enumerate(("jan", "feb"), 1):
        c = ledger.reserve(dataset="monthly", mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                           n_records=30_000, job="j", data_version="v", blocks=[block])
        ledger.start(c.id)
        ledger.commit(c.id, steps_run=100)
        ledger.bind_model(c.id, model_name="monthly", model_version=version, mlflow_run_id="r", artifact_sha256=SHA)
        ledger.record_evidence(c.id, task="classification", figures={"accuracy": 0.9}, audit=GOOD_AUDIT)
        charges[block] = c.id
    tamper(ledger, "UPDATE blocks SET epsilon_cap = 0.05 WHERE name = 'jan'")  # T11: a block's cap edited
    b = ledger.budget("monthly")
    jan = next(x for x in b.blocks if x.name == "jan")
    assert b.spent <= b.epsilon_cap and jan.spent > jan.epsilon_cap  # max vs max passes; jan is over its cap
    unverified = PolicyConfig(min_accuracy=0.7, require_ledger_verified=False)  # the block check alone
    assert gate.decide(ledger, charge_id=charges["jan"], policy=unverified).reasons == [
        f"dataset 'monthly' block 'jan' spent {jan.spent:.3f} > its cap 0.05"]
    assert gate.decide(ledger, charge_id=charges["feb"], policy=unverified).promote  # feb read no record of jan
    assert f"dataset 'monthly' block 'jan' spent {jan.spent:.3f} > its cap 0.05" in gate.decide(
        ledger, charge_id=charges["jan"], policy=POLICY).reasons


# --------------------------------------------------------------------------- task-aware utility, per-dataset thresholds

LM_POLICY = PolicyConfig(min_accuracy=0.7, max_eval_loss=3.0)


def test_a_language_model_is_judged_by_its_eval_loss_not_accuracy(ledger):
    good = _charge(ledger, accuracy=None, task="causal_lm", eval_loss=2.5, perplexity=12.2)
    assert gate.decide(ledger, charge_id=good, policy=LM_POLICY, model=_model(ledger, good)).promote
    bad = _charge(ledger, accuracy=None, task="causal_lm", eval_loss=3.4, perplexity=30.0)
    assert gate.decide(ledger, charge_id=bad, policy=LM_POLICY).reasons == ["eval_loss 3.4000 > policy max_eval_loss 3"]
    # a classifier on the same policy is still judged by accuracy, and its eval loss does not matter
    clf = _charge(ledger, accuracy=0.65, task="classification", eval_loss=9.0)
    assert gate.decide(ledger, charge_id=clf, policy=LM_POLICY).reasons == ["accuracy 0.6500 < policy min_accuracy 0.7"]


def test_a_language_model_fails_every_threshold_it_misses_and_missing_figures_refuse(ledger):
    policy = PolicyConfig(max_eval_loss=3.0, max_perplexity=15.0)
    charge_id = _charge(ledger, commit=False, accuracy=None, task="causal_lm", eval_loss=3.2, perplexity=24.5)
    reasons = gate.decide(ledger, charge_id=charge_id, policy=policy, model=_model(ledger, charge_id)).reasons
    assert reasons == [f"charge {charge_id} is 'running', not committed", "eval_loss 3.2000 > policy max_eval_loss 3",
                       "perplexity 24.5000 > policy max_perplexity 15"]
    bare = _charge(ledger, accuracy=None, task="causal_lm")  # recorded without its eval figures
    assert gate.decide(ledger, charge_id=bare, policy=policy).reasons == [
        "no eval_loss is recorded in the ledger for this charge", "no perplexity is recorded in the ledger for this charge"]
    nan = _charge(ledger, accuracy=None, task="causal_lm", eval_loss=float("nan"), perplexity=float("nan"))
    assert len(gate.decide(ledger, charge_id=nan, policy=policy).reasons) == 2


def test_a_task_without_a_threshold_is_refused(ledger):
    lm = _charge(ledger, accuracy=None, task="causal_lm", eval_loss=0.1, perplexity=1.1)
    reasons = gate.decide(ledger, charge_id=lm, policy=POLICY).reasons  # POLICY sets min_accuracy only
    assert reasons == ["policy sets no utility threshold for task 'causal_lm' (max_eval_loss or max_perplexity, globally "
                       "or under datasets.notes)"]
    odd = _charge(ledger, task="translation")
    assert gate.decide(ledger, charge_id=odd, policy=POLICY).reasons == [
        "task 'translation' recorded in the ledger for this charge has no utility policy"]


def test_per_dataset_thresholds_replace_the_global_one_for_that_dataset_only(ledger):
    policy = PolicyConfig(min_accuracy=0.7, datasets={"medical_abstracts": {"min_accuracy": 0.5}, "notes": {"max_eval_loss": 2.0}})
    medical = _charge(ledger, dataset="medical_abstracts", accuracy=0.57, task="classification")
    assert gate.decide(ledger, charge_id=medical, policy=policy, model=_model(ledger, medical)).promote
    too_low = _charge(ledger, dataset="medical_abstracts", accuracy=0.45, task="classification")
    assert gate.decide(ledger, charge_id=too_low, policy=policy).reasons == [
        "accuracy 0.4500 < policy min_accuracy 0.5 (dataset 'medical_abstracts')"]
    # the same accuracy on another dataset meets the global threshold, and an override of another field keeps it
    notes = _charge(ledger, dataset="notes", accuracy=0.57)
    assert gate.decide(ledger, charge_id=notes, policy=policy).reasons == ["accuracy 0.5700 < policy min_accuracy 0.7"]
    notes_lm = _charge(ledger, dataset="notes", accuracy=None, task="causal_lm", eval_loss=2.5)
    assert gate.decide(ledger, charge_id=notes_lm, policy=policy).reasons == [
        "eval_loss 2.5000 > policy max_eval_loss 2 (dataset 'notes')"]


def test_the_project_policy_lowers_the_bar_for_the_five_class_dataset_only(project_root, tmp_path):
    from dpops.config import loading as config
    from dpops.errors import ConfigError

    policy = config.load_policy(project_root / "configs/policy.yaml")
    assert policy.utility("medical_abstracts", "classification") == {"min_accuracy": 0.5}
    assert policy.utility("sst2", "classification") == {"min_accuracy": 0.7}
    bad = tmp_path / "policy.yaml"
    bad.write_text("min_accuracy: 0.7\ndatasets:\n  medical_abstracts:\n    min_acuracy: 0.5\n")
    with pytest.raises(ConfigError, match="field 'datasets.medical_abstracts.min_acuracy'"):
        config.load_policy(bad)
    bad.write_text("max_perplexity: 0.5\n")
    with pytest.raises(ConfigError, match="field 'max_perplexity'"):
        config.load_policy(bad)


@pytest.mark.slow
def test_a_language_model_run_is_recorded_and_gated_on_its_eval_loss(workspace_env, workspace_ledger, configs_dir, tmp_path,
                                                                   project_root):
    """The stages end to end for task causal_lm (tiny Llama, sst2 smoke data): the record stage notes
    the task and eval figures on the charge, and the gate judges the model by them."""
    import yaml

    from dpops.pipeline import publish, stages
    from dpops.registry import tracking
    from tests.tiny_models import tiny_llama

    job = configs_dir / "jobs/sst2_smoke.yaml"
    data = yaml.safe_load(job.read_text())
    data.update(task="causal_lm", model={"path": str(tiny_llama(tmp_path / "llama")), "max_length": 16},
                lora={"target_modules": ["q_proj", "v_proj"]}, train_max_records=64, eval_max_records=40,
                dp={**data["dp"], "steps": 2, "expected_batch_size": 16}, audit={"canaries": 10})
    job.write_text(yaml.safe_dump(data))
    ref = stages.resolve(str(job), str(project_root))
    plan = stages.plan(str(job), ref, policy_path=policy_accepting_inconclusive(tmp_path))  # 10 canaries test nothing
    charge_id = stages.reserve(str(job), ref, plan)
    trained = stages.train(str(job), ref, plan, charge_id)
    stages.settle(charge_id, trained["steps_run"])
    metrics = stages.evaluate(str(job), ref, trained["model_dir"])
    audit = stages.audit(str(job), plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"])
    rec = publish.record(str(job), ref, plan, charge_id, trained, metrics, audit)

    ledger = workspace_ledger()
    ev = gate.evidence(ledger, charge_id)
    assert ev.model == f"{rec['model_name']}/{rec['model_version']}" and ev.binding["mlflow_run_id"] == rec["run_id"]
    assert ev.binding["artifact_sha256"] == tracking.weights_sha256(trained["model_dir"])
    assert ledger.charge(charge_id).mlflow_run_id == rec["run_id"]
    notes = ev.record
    assert notes["task"] == "causal_lm" and "accuracy" not in notes
    assert notes["eval_loss"] == pytest.approx(metrics["eval_loss"]) and notes["perplexity"] == pytest.approx(metrics["perplexity"])

    policies = tmp_path / "configs"
    refused = publish.promote(str(policies / "policy.yaml"), rec["model_name"], rec["model_version"])  # no causal-LM threshold
    assert refused["decision"] == "REFUSED" and any("no utility threshold for task 'causal_lm'" in r for r in refused["reasons"])
    (policies / "loose.yaml").write_text(yaml.safe_dump({"min_accuracy": 0.99, "max_eval_loss": 1000.0, "require_audit_pass": False}))
    assert publish.promote(str(policies / "loose.yaml"), rec["model_name"], rec["model_version"])["decision"] == "PROMOTED"
    (policies / "strict.yaml").write_text(yaml.safe_dump({"datasets": {"sst2": {"max_eval_loss": 0.01}}, "require_audit_pass": False}))
    strict = publish.promote(str(policies / "strict.yaml"), rec["model_name"], rec["model_version"])
    assert strict["reasons"] == [f"eval_loss {metrics['eval_loss']:.4f} > policy max_eval_loss 0.01 (dataset 'sst2')"]


# --------------------------------------------------------------------------- a claim the audit cannot test


def test_a_claim_the_canaries_cannot_test_is_refused_at_plan_before_any_charge(workspace_env, smoke_job, project_root, tmp_path):
    """10 canaries and no gradient canaries refute at most epsilon 0 at the smoke job's q and 5 steps;
    its epsilon 1 would be INCONCLUSIVE, which the project policy never promotes: refused at plan,
    the ledger untouched."""
    from dpops.assess import bounds
    from dpops.errors import ConfigError
    from dpops.pipeline import stages
    from tests.helpers import edit_yaml

    edit_yaml(smoke_job, lambda d: d["audit"].update(canaries=10, gradient_canaries=0))
    policy = smoke_job.parent.parent / "policy.yaml"
    ref = stages.resolve(str(smoke_job), str(project_root))
    for path in (str(policy), None):  # the project's policy, and the defaults when none is given
        with pytest.raises(ConfigError) as err:
            stages.plan(str(smoke_job), ref, policy_path=path)
        assert not (workspace_env / "ledger.db").exists(), "plan must not touch the ledger"
    accepted = stages.plan(str(smoke_job), ref, policy_path=policy_accepting_inconclusive(tmp_path))
    ceiling, _ = bounds.planned_ceiling(10, 0, sample_rate=accepted["sample_rate"], steps=accepted["steps"], delta=accepted["delta"])
    message = str(err.value)
    for part in (str(smoke_job), "field 'audit.canaries' (10)", "field 'audit.gradient_canaries' (0)", "field 'dp.target_epsilon' is 1", f"claim epsilon {accepted['epsilon']:.3f}",
                 f"refute at most epsilon {ceiling:.3f}", "INCONCLUSIVE", "accept_inconclusive", "Nothing was charged"):
        assert part in message, (part, message)
    assert accepted["epsilon"] >= ceiling
    no_audit_gate = tmp_path / "no_audit.yaml"
    no_audit_gate.write_text("min_accuracy: 0.7\nrequire_audit_pass: false\n")  # the verdict does not gate: nothing to refuse
    assert stages.plan(str(smoke_job), ref, policy_path=str(no_audit_gate)) == accepted
    charge_id = stages.reserve(str(smoke_job), ref, accepted)  # accepted: the charge is admitted
    assert Ledger(f"sqlite:///{workspace_env / 'ledger.db'}").charge(charge_id).state == "reserved"
    # enough canaries for the claim: planned under the strict policy
    edit_yaml(smoke_job, lambda d: d["audit"].update(canaries=100, gradient_canaries=2000))
    strict = stages.plan(str(smoke_job), ref, policy_path=str(policy))
    assert strict["epsilon"] < bounds.planned_ceiling(100, 2000, sample_rate=strict["sample_rate"], steps=strict["steps"],
                                                     delta=strict["delta"])[0]
