"""The deployment gate (stage 10): promote a model version only on the ledger's word, and serve
only what it promoted.

Every condition is read from the ledger, never from MLflow tags (which anyone with write access
can edit): the charge of the version, its state, its dataset's budget (block by block for a
partitioned dataset), the hash chain, and the evidence the record stage wrote once on the charge:
its **model binding** (``model_bound``: model name, version, MLflow run id, SHA-256 of the weight
file) and its **evidence** (``evidence``: task, utility figures, audit verdict). Both are written
at most once per charge (:meth:`dpops.ledger.store.Ledger.bind_model`, :meth:`~dpops.ledger.store.Ledger.record_evidence`);
``annotated`` notes are never read here. An INCONCLUSIVE verdict promotes only when the policy sets
``accept_inconclusive``. The MLflow tag ``dpops.charge_id`` is only a pointer, and the charge's
binding must name the same model version back. Each failed condition is named.

A charge recorded before bindings and evidence were written once holds its figures only in
``annotated`` notes, where a later note could have replaced any of them (later notes won): the
gate refuses it, saying so, rather than guess which note was the record stage's (reading the first
value of each key would still trust a note written before the record stage ran).

Utility is judged per task (:data:`UTILITY`): a classifier by its eval accuracy, a language model
by its eval loss or perplexity (it has no accuracy). The policy may set other thresholds for one
dataset (``datasets:`` in ``configs/policy.yaml``); a task the policy sets no threshold for is
refused, not waved through.

Serving (:func:`serving_reasons`, for ``dpops predict`` and ``dpops serve``) needs a PROMOTED
``gate_decision`` for exactly that model, version and alias, not revoked by a later decision, and
weights whose hash is the binding's: an alias set in the MLflow UI or by ``MlflowClient`` is not enough.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from dpops.assess.audit import INCONCLUSIVE, PASS
from dpops.config.policy import TASK_UTILITY, PolicyConfig
from dpops.ledger.states import COMMITTED, EVIDENCE, GATE_KEYS, MODEL_BOUND, Charge
from dpops.ledger.store import Ledger

PROMOTED, REFUSED = "PROMOTED", "REFUSED"

#: Policy field -> (figure the record stage records on the charge, whether higher is better).
UTILITY = {
    "min_accuracy": ("accuracy", True),
    "max_eval_loss": ("eval_loss", False),
    "max_perplexity": ("perplexity", False),
}
#: Eval figures the record stage records on a charge for the gate (:data:`dpops.ledger.store.EVIDENCE_FIGURES`).
UTILITY_FIGURES = tuple(figure for figure, _ in UTILITY.values())
#: Why a charge whose gate figures are only in ``annotated`` notes is refused (see the module docstring).
LEGACY_EVIDENCE = ("its model and gate evidence are only in 'annotated' notes, written before bindings and evidence were "
                   "recorded once (a later note could have replaced them): not trusted, so this charge cannot be promoted")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    #: What the gate read of the audit, whatever it decided: verdict, bounds, ceiling, pooled evidence.
    evidence: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return PROMOTED if self.promote else REFUSED


@dataclass(frozen=True)
class Evidence:
    """What the record stage wrote once on a charge: its model binding and its evidence (None when absent)."""

    binding: Optional[dict[str, Any]]
    record: Optional[dict[str, Any]]
    #: The charge has no binding and no evidence, but ``annotated`` notes with gate keys (an old ledger).
    legacy: bool = False

    @property
    def model(self) -> Optional[str]:
        """``"name/version"`` of the bound model, or None."""
        return f"{self.binding['model_name']}/{self.binding['model_version']}" if self.binding else None


def evidence(ledger: Ledger, charge_id: str) -> Evidence:
    """The charge's ``model_bound`` and ``evidence`` events (each written at most once; the first
    is read should a forged second exist). ``annotated`` notes count only to tell an old ledger."""
    bindings = ledger.charge_records(charge_id, MODEL_BOUND)
    records = ledger.charge_records(charge_id, EVIDENCE)
    legacy = not bindings and not records and any(
        GATE_KEYS & set(note) for note in ledger.charge_records(charge_id, "annotated"))
    return Evidence(bindings[0] if bindings else None, records[0] if records else None, legacy)


def ledger_problems(ledger: Ledger) -> list[str]:
    """Why the ledger cannot be believed (empty: it verifies). The one place the gate and serving
    check the ledger: its chains, and the anchors kept outside the database (:mod:`dpops.ledger.anchors`)
    when the ledger was opened with a log that exists, so a truncated tail or a consistent rewrite
    (evidence re-stated and rehashed) is refused too. Anchors that cannot be checked (no key) are a
    problem, not a pass."""
    from dpops.errors import DpopsError
    from dpops.ledger.anchors import verify_anchors

    problems = ledger.verify()
    log = getattr(ledger, "anchors", None)
    if log is not None and log.path.exists():
        try:
            problems += verify_anchors(ledger, log)
        except DpopsError as exc:
            problems.append(f"its anchors cannot be checked: {exc}")
    return problems


def _ledger_reason(problems: list[str]) -> list[str]:
    if not problems:
        return []
    return [f"ledger does not verify: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")]


def _budget_reasons(ledger: Ledger, charge: Charge) -> list[str]:
    """The dataset over its cap; for a partitioned dataset, every block the charge read (all of
    them, when it read the whole dataset) over its own cap, by name. Comparing the largest spend
    with the largest cap would pass a block over a small cap while another has room."""
    b = ledger.budget(charge.dataset)
    if not b.blocks:
        return [] if b.spent <= b.epsilon_cap else [f"dataset {charge.dataset!r} spent {b.spent:.3f} > cap {b.epsilon_cap:g}"]
    read = set(charge.blocks)
    return [f"dataset {charge.dataset!r} block {x.name!r} spent {x.spent:.3f} > its cap {x.epsilon_cap:g}"
            for x in b.blocks if (not read or x.name in read) and not x.spent <= x.epsilon_cap]


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


def audit_evidence(audit: Any) -> list[str]:
    """The audit figures recorded on a charge, as the gate states them (figures only). Each bound is
    valid for one run of one model; the membership-inference heuristics are not recorded."""
    if not isinstance(audit, dict) or "verdict" not in audit:
        return []
    line = f"audit {audit['verdict']}"
    if audit.get("decided_by"):
        line += f" (decided by the {audit['decided_by']})"
    parts = []
    if isinstance(audit.get("claimed_epsilon"), (int, float)):
        parts.append(f"claimed epsilon {audit['claimed_epsilon']:.3f}")
    if audit.get("white_box_ceiling"):
        parts.append(f"white-box lower bound {audit.get('white_box_epsilon_lower_bound', 0.0):.3f} of at most "
                     f"{audit['white_box_ceiling']:.3f}")
        if isinstance(audit.get("noise_multiplier_upper"), (int, float)):
            parts.append(f"noise seen at most {audit['noise_multiplier_upper']:.3f} C")
    if isinstance(audit.get("canary_epsilon_lower_bound"), (int, float)) and isinstance(audit.get("canary_ceiling"), (int, float)):
        parts.append(f"black-box lower bound {audit['canary_epsilon_lower_bound']:.3f} of at most {audit['canary_ceiling']:.3f}")
    return [line + (": " + "; ".join(parts) if parts else "")]


def pooled_evidence(ledger: Ledger, dataset: str, audit: Any, *, pending: bool = False) -> Optional[dict[str, Any]]:
    """The dataset's pooled audit evidence for the mechanism of ``audit`` (:mod:`dpops.pooling`):
    every run recorded in the ledger with the same mechanism, plus ``audit`` itself when its
    evidence is not recorded yet (``pending``). White-box outcomes when the run has them, else
    black-box. The confidence is spent over the looks (:func:`dpops.assess.pooling.sequential_confidence`:
    the k-th run's pooled bound is one more test on overlapping data), so the sequence of pooled
    bounds a dataset shows holds at 95 % together. Reported, never deciding. None without outcomes.
    """
    from dpops.assess import pooling

    if not (isinstance(audit, dict) and isinstance(audit.get("outcomes"), dict) and isinstance(audit.get("mechanism"), dict)):
        return None
    mechanism = audit["mechanism"]
    if not all(isinstance(mechanism.get(k), (int, float)) for k in pooling.MECHANISM_KEYS):
        return None
    kind = "white_box" if audit["outcomes"].get("white_box") else "black_box"
    evidence = [payload for _, payload in ledger.evidence_of(dataset)] + ([audit] if pending else [])
    pooled = pooling.dataset_pool(evidence, mechanism=mechanism, kind=kind, sequential=True)
    return {**pooled.to_dict(), "kind": kind} if pooled.runs else None


def pooled_line(pooled: Optional[dict[str, Any]]) -> list[str]:
    """The pooled evidence as the gate and the summary state it."""
    if not pooled:
        return []
    lo, hi = pooled.get("bayes_epsilon_lo"), pooled.get("bayes_epsilon_hi")
    # The interval is for the epsilon this attack demonstrates (its TPR/FPR trade-off), not an upper bound on the mechanism's.
    interval = (f"; Bayesian interval of the epsilon the attack demonstrates [{lo:.2f}, {'inf' if hi is None else f'{hi:.2f}'}]"
                if lo is not None else "")
    return [f"pooled over {pooled['runs']} run(s) of this mechanism ({pooled['canaries']} {pooled['kind'].replace('_', '-')} "
            f"canaries): epsilon lower bound {pooled['epsilon_lower_bound']:.3f} at {pooled['confidence']:.4g} confidence, "
            f"claimed {pooled['claimed_epsilon']:.3f}{interval} (reported, not deciding)"]


def decide(ledger: Ledger, *, charge_id: str, policy: PolicyConfig, model: Optional[str] = None) -> Decision:
    """Check the policy against the ledger; return the decision with every failed condition.

    Args:
        model: ``"name/version"`` being promoted; the charge must be bound to it.

    Raises:
        LedgerError: the charge does not exist.
    """
    reasons: list[str] = []
    charge = ledger.charge(charge_id)
    ev = evidence(ledger, charge_id)
    if ev.legacy:
        reasons.append(f"charge {charge_id}: {LEGACY_EVIDENCE}")
    elif ev.binding is None:
        reasons.append(f"charge {charge_id} is bound to no model in the ledger" + (f", not {model!r}" if model else ""))
    elif model is not None and ev.model != model:
        reasons.append(f"charge {charge_id} was recorded for model {ev.model!r}, not {model!r}")
    if charge.state != COMMITTED:
        reasons.append(f"charge {charge_id} is {charge.state!r}, not committed")
    reasons.extend(_budget_reasons(ledger, charge))
    if policy.require_ledger_verified:
        reasons.extend(_ledger_reason(ledger_problems(ledger)))
    if ev.record is not None:
        if policy.require_audit_pass:
            reasons.extend(_audit_reasons(ev.record, policy))
        reasons.extend(_utility_reasons(ev.record, policy, charge.dataset))
    elif not ev.legacy:  # an old charge's reason is named above: none of its notes is read
        reasons.append(f"charge {charge_id} has no evidence in the ledger (no task, utility figures or audit verdict recorded)")
    stated = []
    if ev.record is not None:
        stated = audit_evidence(ev.record.get("audit")) + pooled_line(pooled_evidence(ledger, charge.dataset, ev.record.get("audit")))
    return Decision(promote=not reasons, reasons=reasons, evidence=stated)


def serving_reasons(ledger: Ledger, model_name: str, version: str, alias: str, artifact_sha256: str, *,
                    mlflow_run_id: Optional[str] = None) -> list[str]:
    """Why ``model_name`` version ``version``, reached through ``alias``, must not be served (empty: serve it).

    Every serving path (``dpops predict``, ``dpops serve``) calls this with the SHA-256 of the
    weight file it is about to load. It needs: the version bound to exactly one charge, that
    charge committed, the weights' hash equal to the binding's (and the MLflow run, when given,
    the binding's); a PROMOTED ``gate_decision`` for exactly this model, version and alias, on the
    bound charge, and no later decision on this version that is not PROMOTED; and a ledger that
    verifies. An alias set in MLflow by anyone but the gate meets none of the decision conditions.
    """
    model = f"{model_name}/{version}"
    reasons: list[str] = []
    bound = ledger.bindings_of(model_name, version)
    charge_id = None
    if not bound:
        reasons.append(f"model {model} is bound to no ledger charge (no model_bound event): no dpops run recorded it")
    elif len(bound) > 1:
        reasons.append(f"model {model} is bound to {len(bound)} charges ({', '.join(b[0] for b in bound)}); a version has one")
    else:
        charge_id, _dataset, binding = bound[0]
        if binding["artifact_sha256"] != artifact_sha256:
            reasons.append(f"model {model}: the weights loaded (trainable.safetensors, sha256 {artifact_sha256}) are not the "
                           f"weights bound to charge {charge_id} (sha256 {binding['artifact_sha256']}): the artifact was replaced")
        if mlflow_run_id is not None and binding["mlflow_run_id"] != mlflow_run_id:
            reasons.append(f"model {model} comes from MLflow run {mlflow_run_id}, but charge {charge_id} is bound to run "
                           f"{binding['mlflow_run_id']}")
        state = ledger.charge(charge_id).state
        if state != COMMITTED:
            reasons.append(f"charge {charge_id} of model {model} is {state!r}, not committed")
    decisions = ledger.gate_decisions(model)
    promoted = [i for i, d in enumerate(decisions) if d["payload"].get("decision") == PROMOTED and d["payload"].get("alias") == alias]
    if not promoted:
        reasons.append(f"the ledger holds no PROMOTED gate decision for model {model} with alias {alias!r}: an alias set "
                       "outside `dpops promote` is not served")
    else:
        last = decisions[promoted[-1]]
        if charge_id is not None and last["charge"] != charge_id:
            reasons.append(f"the gate promoted model {model} on charge {last['charge']}, but the version is bound to charge {charge_id}")
        revoked = [d for d in decisions[promoted[-1] + 1:] if d["payload"].get("decision") != PROMOTED]
        if revoked:
            reasons.append(f"the gate decided {revoked[-1]['payload'].get('decision')} on model {model} (dataset "
                           f"{revoked[-1]['dataset']!r} event {revoked[-1]['seq']}) after promoting it as {alias!r}")
    reasons.extend(_ledger_reason(ledger_problems(ledger)))
    return reasons


def _utility_reasons(notes: dict[str, Any], policy: PolicyConfig, dataset: str) -> list[str]:
    """Every utility threshold of the charge's task (from the policy, with the dataset's overrides) it fails."""
    task = notes["task"]
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
