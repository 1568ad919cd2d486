"""No raw statistic of a private batch leaves the trainer: not its loss, not its size.

A real (tiny) run through the stages: what the train stage returns (the ``dp-train`` flow persists
it as JSON), every log record and the MLflow run must hold none of the losses the trainer computed
on its Poisson batches, and the MLflow run must say that the training-loss curve is not released.
"""

from __future__ import annotations

import logging
import math

import pytest

from dpops.config.workspace import workspace
from dpops.models import hf as modeling
from dpops.pipeline import publish, stages
from dpops.registry import tracking
from tests.helpers import edit_yaml, policy_accepting_inconclusive
from tests.tiny_models import tiny_bert


def _numbers(value):
    """Every number inside a JSON-like value."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield float(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _numbers(v)


def _is_a_batch_loss(x: float, losses: list[float]) -> bool:
    return any(math.isclose(x, loss, rel_tol=1e-6) for loss in losses)


@pytest.mark.slow
def test_a_real_run_releases_no_loss_of_a_private_batch(workspace_env, smoke_job, project_root, tmp_path, monkeypatch, caplog):
    edit_yaml(smoke_job, lambda d: d.update(
        model={"path": str(tiny_bert(tmp_path / "bert")), "max_length": 16}, train_max_records=64, eval_max_records=40,
        dp={**d["dp"], "steps": 3, "expected_batch_size": 16}, audit={"canaries": 10},
    ))
    # Every mean loss the trainer computes on a private batch (or piece of one), while it trains.
    batch_losses: list[float] = []
    training_now = [False]
    real_loss = modeling.per_example_loss

    def spy(task, outputs, y, *args):
        losses = real_loss(task, outputs, y, *args)
        if training_now[0] and len(y):
            batch_losses.append(float(losses.detach().float().mean()))
        return losses

    monkeypatch.setattr(modeling, "per_example_loss", spy)
    caplog.set_level(logging.DEBUG)

    ref = stages.resolve(str(smoke_job), str(project_root))
    plan = stages.plan(str(smoke_job), ref, policy_path=policy_accepting_inconclusive(smoke_job.parent))
    charge_id = stages.reserve(str(smoke_job), ref, plan)
    training_now[0] = True
    trained = stages.train(str(smoke_job), ref, plan, charge_id)
    training_now[0] = False
    assert trained["steps_run"] == 3 and len(batch_losses) >= 3
    stages.settle(charge_id, trained["steps_run"])
    metrics = stages.evaluate(str(smoke_job), ref, trained["model_dir"])
    audit = stages.audit(str(smoke_job), plan, trained["model_dir"], trained["steps_run"], trained["canaries_path"])
    rec = publish.record(str(smoke_job), ref, plan, charge_id, trained, metrics, audit)

    # The train stage's result (what dp-train persists): no loss, under any name or as any number.
    assert not [k for k in trained if "loss" in k or "batch" in k], sorted(trained)
    assert not [x for x in _numbers(trained) if _is_a_batch_loss(x, batch_losses)]

    # Log records: no loss and no batch size, in words or in figures.
    assert [r for r in caplog.records if r.name == "dpops.training" and r.getMessage().startswith("step ")], \
        "the trainer's progress line was logged"
    for r in caplog.records:
        message = r.getMessage()
        if r.name.startswith("dpops"):
            assert "loss" not in message.lower() and "batch" not in message.lower(), message
        assert not [loss for loss in batch_losses if f"{loss:.4f}" in message], message

    # The MLflow run: no training-loss metric, no metric value that is a batch loss, and a tag saying so.
    _, client = tracking._client(workspace())
    run = client.get_run(rec["run_id"])
    assert not [k for k in run.data.metrics if k.startswith("train") and "loss" in k]
    for key in run.data.metrics:
        values = [m.value for m in client.get_metric_history(rec["run_id"], key)]
        assert not [v for v in values if _is_a_batch_loss(v, batch_losses)], key
    assert run.data.tags["dpops.train_loss_curve"] == tracking.TRAIN_LOSS_CURVE
    assert run.data.tags["dpops.train_loss_curve"].startswith("not released")
    assert not [k for k in run.data.params if "loss" in k]
