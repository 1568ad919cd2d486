"""Audit (stage 8): membership inference and an independent accounting cross-check.

The loss-threshold membership-inference attack scores training records (members) against
hold-out records of the same population (non-members). Its AUC and TPR at low FPR are reported,
and an empirical epsilon lower bound is derived from Clopper-Pearson intervals: if that bound
exceeds the claimed epsilon, the DP implementation or its accounting is broken.

On a correctly private model this attack is weak (AUC near 0.5); it is evidence against a claim,
never proof of one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import beta

from dpops import accounting
from dpops.accounting import SubsampledGaussian

#: Pre-registered FPR targets; the lower bound is Bonferroni-corrected over them.
FPR_GRID: tuple[float, ...] = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)


def auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(tie): the ROC AUC (higher score = member)."""
    m = np.asarray(member_scores, dtype=float)
    n = np.asarray(non_member_scores, dtype=float)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(sorted_v):
        j = i
        while j + 1 < len(sorted_v) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_m = ranks[: len(m)].sum()
    return float((r_m - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def tpr_at_fpr(member_scores: Sequence[float], non_member_scores: Sequence[float], fpr: float) -> float:
    """TPR of the threshold that flags at most ``fpr`` of the non-members."""
    m = np.asarray(member_scores, dtype=float)
    n = np.sort(np.asarray(non_member_scores, dtype=float))[::-1]
    k = int(math.floor(fpr * len(n)))
    threshold = n[k] if k < len(n) else -np.inf  # flag scores strictly above the (k+1)-th largest
    return float((m > threshold).mean())


def _cp_lower(k: int, n: int, alpha: float) -> float:
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def epsilon_lower_bound(
    member_scores: Sequence[float], non_member_scores: Sequence[float], *, delta: float, confidence: float = 0.95
) -> float:
    """Empirical epsilon lower bound of the attack at ``confidence`` (one-sided, Bonferroni over
    :data:`FPR_GRID` and the two directions of the test).

    For a threshold with true positive rate TPR and false positive rate FPR, (eps, delta)-DP
    implies TPR <= e^eps FPR + delta, so eps >= log((TPR_lo - delta) / FPR_hi).
    """
    m = np.asarray(member_scores, dtype=float)
    n = np.sort(np.asarray(non_member_scores, dtype=float))[::-1]
    alpha = (1 - confidence) / (2 * len(FPR_GRID))
    best = 0.0
    for target in FPR_GRID:
        k = int(math.floor(target * len(n)))
        threshold = n[k] if k < len(n) else -np.inf
        tp, fp = int((m > threshold).sum()), int((n > threshold).sum())
        tpr_lo, fpr_hi = _cp_lower(tp, len(m), alpha), _cp_upper(fp, len(n), alpha)
        if tpr_lo - delta > 0 and fpr_hi > 0:
            best = max(best, math.log((tpr_lo - delta) / fpr_hi))
        # the complementary test (flag as non-member): 1 - FPR <= e^eps (1 - TPR) + delta
        tnr_lo, fnr_hi = _cp_lower(len(n) - fp, len(n), alpha), _cp_upper(len(m) - tp, len(m), alpha)
        if tnr_lo - delta > 0 and fnr_hi > 0:
            best = max(best, math.log((tnr_lo - delta) / fnr_hi))
    return best


def cross_check_epsilon(mechanism: SubsampledGaussian, *, delta: float) -> tuple[float, float]:
    """(dpops's epsilon, Google dp_accounting's RDP epsilon) for the same mechanism and orders."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    ours = accounting.epsilon([mechanism], delta=delta)
    acc = RdpAccountant(orders=list(accounting.RDP_ORDERS))
    if mechanism.steps:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(mechanism.sample_rate, dp_accounting.GaussianDpEvent(mechanism.noise_multiplier)),
            int(mechanism.steps),
        )
    return ours, float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class AuditResult:
    claimed_epsilon: float
    delta: float
    mia_auc: float
    mia_tpr_at_1pct_fpr: float
    mia_tpr_at_01pct_fpr: float
    mia_epsilon_lower_bound: float
    members: int
    non_members: int
    accountant_epsilon: float
    cross_check_epsilon: float
    cross_check_ok: bool
    passed: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def run_audit(
    *,
    member_losses: Sequence[float],
    non_member_losses: Sequence[float],
    mechanism: SubsampledGaussian,
    delta: float,
    rel_tolerance: float = 1e-6,
) -> AuditResult:
    """Score the loss-threshold attack and cross-check the accounting; decide pass or fail.

    Fails when the empirical lower bound exceeds the claimed epsilon or the two accountants
    disagree by more than ``rel_tolerance`` (relative).
    """
    members = -np.asarray(member_losses, dtype=float)  # lower loss -> more likely a member
    non_members = -np.asarray(non_member_losses, dtype=float)
    ours, theirs = cross_check_epsilon(mechanism, delta=delta)
    ok = math.isclose(ours, theirs, rel_tol=rel_tolerance, abs_tol=1e-12)
    lb = epsilon_lower_bound(members, non_members, delta=delta)
    reasons = []
    if lb > ours:
        reasons.append(f"membership-inference lower bound {lb:.3f} exceeds the claimed epsilon {ours:.3f}")
    if not ok:
        reasons.append(f"accounting cross-check mismatch: dpops {ours:.6f} vs dp_accounting {theirs:.6f}")
    return AuditResult(
        claimed_epsilon=ours, delta=delta, mia_auc=auc(members, non_members),
        mia_tpr_at_1pct_fpr=tpr_at_fpr(members, non_members, 0.01),
        mia_tpr_at_01pct_fpr=tpr_at_fpr(members, non_members, 0.001),
        mia_epsilon_lower_bound=lb, members=len(members), non_members=len(non_members),
        accountant_epsilon=ours, cross_check_epsilon=theirs, cross_check_ok=ok,
        passed=not reasons, reasons=tuple(reasons),
    )
