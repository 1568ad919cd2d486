"""The promotion policy: what the gate requires of a model before it gets the production alias.

``configs/policy.yaml`` loads into :class:`PolicyConfig` (:func:`dpops.config.loading.load_policy`):
utility thresholds per task, optionally per dataset, and which of the audit's and the ledger's
conditions promotion needs.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field, StringConstraints

from dpops.config.schema import MAX_NAME_CHARS, MODEL_NAME_PATTERN, NAME_PATTERN, _Strict


class UtilityPolicy(_Strict):
    """What a model must reach on its dataset's eval split; each task is judged by its own figures."""

    min_accuracy: Optional[float] = Field(
        default=None, ge=0, le=1, description="Task 'classification': eval accuracy at or above this."
    )
    max_eval_loss: Optional[float] = Field(
        default=None, gt=0,
        description="Task 'causal_lm': mean next-token cross-entropy (nats per token, each text weighted equally) on the "
        "eval split at or below this.",
    )
    max_perplexity: Optional[float] = Field(
        default=None, ge=1, description="Task 'causal_lm': eval perplexity (exp of the eval loss) at or below this."
    )


#: The policy fields that judge each task.
TASK_UTILITY = {"classification": ("min_accuracy",), "causal_lm": ("max_eval_loss", "max_perplexity")}


class PolicyConfig(UtilityPolicy):
    datasets: dict[Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=MAX_NAME_CHARS)], UtilityPolicy] = Field(
        default_factory=dict,
        description="Per-dataset utility thresholds (keys: ledger dataset names); a field set here replaces the "
        "global one for that dataset (e.g. a five-class dataset cannot reach a two-class accuracy). Only utility: "
        "the budget, audit and ledger conditions hold for every dataset.",
    )
    require_audit_pass: bool = Field(default=True, description="Promotion needs the audit to pass.")
    accept_inconclusive: bool = Field(
        default=False,
        description="With `require_audit_pass`, also promote a model whose audit is INCONCLUSIVE: its epsilon is at or "
        "above the most its canaries can refute, so the audit tested nothing. false: the plan stage refuses such a "
        "job before anything is charged (it could never be promoted), naming `audit.canaries` and `dp.target_epsilon`.",
    )
    require_ledger_verified: bool = Field(default=True, description="Promotion needs the ledger's hash chain to verify.")
    alias: str = Field(default="production", pattern=MODEL_NAME_PATTERN, max_length=MAX_NAME_CHARS,
                       description="MLflow alias set on promotion.")

    def utility(self, dataset: str, task: str) -> dict[str, float]:
        """The thresholds that judge a ``task`` model of ``dataset``: policy field -> limit (only those set).

        A field set under ``datasets.<dataset>`` replaces the global one.
        """
        limits = {}
        for name in TASK_UTILITY.get(task, ()):
            value = getattr(self.datasets[dataset] if self.overridden(dataset, name) else self, name)
            if value is not None:
                limits[name] = value
        return limits

    def overridden(self, dataset: str, name: str) -> bool:
        """Whether ``name`` comes from this dataset's override."""
        override = self.datasets.get(dataset)
        return override is not None and getattr(override, name) is not None
