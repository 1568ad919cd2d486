"""The deployment gate (stage 10): promote a model version only on the ledger's word.

Every condition is read from the ledger, never from MLflow tags (which anyone with write access
can edit): the charge of the version, its state, its dataset's budget, the hash chain, and the
audit verdict, task and utility figures that the record stage appended to the charge's chain (an
INCONCLUSIVE verdict promotes only when the policy sets ``accept_inconclusive``). The
MLflow tag ``dpops.charge_id`` is only a pointer, and the charge must name the same model version
back. Each failed condition is named.

Utility is judged per task (:data:`UTILITY`): a classifier by its eval accuracy, a language model
by its eval loss or perplexity (it has no accuracy). The policy may set other thresholds for one
dataset (``datasets:`` in ``configs/policy.yaml``); a task the policy sets no threshold for is
refused, not waved through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dpops.audit import INCONCLUSIVE, PASS
from dpops.config import TASK_UTILITY, PolicyConfig
from dpops.ledger import COMMITTED, Ledger

PROMOTED, REFUSED = "PROMOTED", "REFUSED"

#: Policy field -> (figure the record stage notes on the charge, whether higher is better).
UTILITY = {
    "min_accuracy": ("accuracy", True),
    "max_eval_loss": ("eval_loss", False),
    "max_perplexity": ("perplexity", False),
}
#: Eval figures the record stage appends to a charge for the gate.
UTILITY_FIGURES = tuple(figure for figure, _ in UTILITY.values())
#: The task of a charge whose notes name none: charges recorded before tasks were noted are classifiers.
DEFAULT_TASK = "classification"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return PROMOTED if self.promote else REFUSED


def evidence(ledger: Ledger, charge_id: str) -> dict[str, Any]:
    """What later stages appended to a charge (``annotated`` events, later ones win)."""
    dataset = ledger.charge(charge_id).dataset
    notes: dict[str, Any] = {}
    for event in ledger.history(dataset):
        if event["event"] == "annotated" and event["charge"] == charge_id:
            notes.update(event["payload"])
    return notes


def _audit_reasons(notes: dict[str, Any], policy: PolicyConfig) -> list[str]:
    """Why the recorded audit verdict refuses: PASS never does, INCONCLUSIVE only when the policy
    does not accept it (``accept_inconclusive``), anything else always."""
    audit = notes.get("audit")
    if not isinstance(audit, dict):
        return ["no audit result is recorded in the ledger for this charge"]
    verdict = audit.get("verdict")
    if verdict == PASS or (verdict == INCONCLUSIVE and policy.accept_inconclusive):
        return []
    why = "; ".join(audit.get("reasons") or [])
    return [f"audit verdict {audit.get('verdict')}" + (f": {why}" if why else "")]


def decide(ledger: Ledger, *, charge_id: str, policy: PolicyConfig, model: Optional[str] = None) -> Decision:
    """Check the policy against the ledger; return the decision with every failed condition.

    Args:
        model: ``"name/version"`` being promoted; the charge must have been recorded for it.

    Raises:
        LedgerError: the charge does not exist.
    """
    reasons: list[str] = []
    charge = ledger.charge(charge_id)
    notes = evidence(ledger, charge_id)
    if model is not None and notes.get("model") != model:
        reasons.append(f"charge {charge_id} was recorded for model {notes.get('model')!r}, not {model!r}")
    if charge.state != COMMITTED:
        reasons.append(f"charge {charge_id} is {charge.state!r}, not committed")
    budget = ledger.budget(charge.dataset)
    if budget.spent > budget.epsilon_cap:
        reasons.append(f"dataset {charge.dataset!r} spent {budget.spent:.3f} > cap {budget.epsilon_cap:g}")
    if policy.require_ledger_verified:
        problems = ledger.verify()
        if problems:
            reasons.append(f"ledger does not verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    if policy.require_audit_pass:
        reasons.extend(_audit_reasons(notes, policy))
    reasons.extend(_utility_reasons(notes, policy, charge.dataset))
    return Decision(promote=not reasons, reasons=reasons)


def _utility_reasons(notes: dict[str, Any], policy: PolicyConfig, dataset: str) -> list[str]:
    """Every utility threshold of the charge's task (from the policy, with the dataset's overrides) it fails."""
    task = notes.get("task", DEFAULT_TASK)
    if task not in TASK_UTILITY:
        return [f"task {task!r} recorded in the ledger for this charge has no utility policy"]
    limits = policy.utility(dataset, task)
    if not limits:
        return [f"policy sets no utility threshold for task {task!r} ({' or '.join(TASK_UTILITY[task])}, globally or "
                f"under datasets.{dataset})"]
    reasons = []
    for name, limit in limits.items():
        figure, higher_is_better = UTILITY[name]
        value = notes.get(figure)
        where = f" (dataset {dataset!r})" if policy.overridden(dataset, name) else ""
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            reasons.append(f"no {figure} is recorded in the ledger for this charge")
        elif higher_is_better and not value >= limit:  # NaN fails both ways
            reasons.append(f"{figure} {value:.4f} < policy {name} {limit:g}{where}")
        elif not higher_is_better and not value <= limit:
            reasons.append(f"{figure} {value:.4f} > policy {name} {limit:g}{where}")
    return reasons
