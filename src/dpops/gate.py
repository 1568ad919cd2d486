"""The deployment gate (stage 10): promote a model version only on the ledger's word.

Every condition is read from the ledger or passed in from the run's own results, never from
MLflow tags (which anyone with write access can edit). Each failed condition is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dpops.config import PolicyConfig
from dpops.ledger import COMMITTED, Ledger


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return "PROMOTED" if self.promote else "REFUSED"


def decide(ledger: Ledger, *, charge_id: str, accuracy: float, audit_passed: bool, policy: PolicyConfig) -> Decision:
    """Check the policy; return the decision with every failed condition."""
    reasons: list[str] = []
    charge = ledger.charge(charge_id)
    if charge.state != COMMITTED:
        reasons.append(f"charge {charge_id} is {charge.state!r}, not committed")
    budget = ledger.budget(charge.dataset)
    if budget.spent > budget.epsilon_cap:
        reasons.append(f"dataset {charge.dataset!r} spent {budget.spent:.3f} > cap {budget.epsilon_cap:g}")
    if policy.require_ledger_verified:
        problems = ledger.verify()
        if problems:
            reasons.append(f"ledger does not verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    if policy.require_audit_pass and not audit_passed:
        reasons.append("audit failed")
    if accuracy < policy.min_accuracy:
        reasons.append(f"accuracy {accuracy:.4f} < policy min_accuracy {policy.min_accuracy}")
    return Decision(promote=not reasons, reasons=reasons)
