"""Audit (stage 8): one-run canary audit, membership inference, accounting cross-check.

Three checks of a run's privacy claim. The first two score only the synthetic canaries
(:mod:`dpops.canaries`) with the DP model, so every figure they release is post-processing of the
DP output: no real record, training or hold-out, is scored, and no statistic of one is computed.

* **One-run canary audit** (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
  training run"). ``m`` synthetic canaries (see :mod:`dpops.canaries`) are each included in the
  training run with probability 1/2; afterwards the auditor guesses, from each canary's score,
  which were included. ``v`` correct guesses out of ``r`` imply an empirical epsilon lower bound
  (:func:`one_run_epsilon_lower_bound`). This is the audit that can fail a run: canaries carry
  content no real record has, so a run without noise memorises them.
* **Loss-threshold membership inference** on the canaries: the included ones are the members,
  the others the non-members. AUC, TPR at low FPR, and a Clopper-Pearson epsilon lower bound (it
  treats the canaries as independent trials, so it is a heuristic beside the one-run bound, which
  is the rigorous test of the same scores); it is reported and also gates.
* **Accounting cross-check**: the run epsilon recomputed by Google's ``dp_accounting``.

Verdict (:func:`run_audit`): FAIL when a lower bound exceeds the claimed epsilon (the DP
implementation or its accounting is broken) or the accountants disagree; INCONCLUSIVE when the
claim is at or above what ``m`` canaries can ever refute (:func:`one_run_ceiling`); PASS otherwise.
A PASS is evidence against gross bugs (noise missing or far too small, sampling mismatch), never
proof of the claim. The plan stage refuses, before anything is charged, a job whose planned claim
would be INCONCLUSIVE, unless the policy accepts that verdict (``accept_inconclusive``).

The dataset's hold-out split is not read here: nothing dpops releases is computed from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import beta, binom

from dpops import accounting
from dpops.accounting import SubsampledGaussian

#: Pre-registered FPR targets; the lower bound is Bonferroni-corrected over them.
FPR_GRID: tuple[float, ...] = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5)

#: Pre-registered guess fractions of the one-run audit: r = fraction * m guesses, the rest abstain.
GUESS_GRID: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)

#: Pre-registered ways to split r guesses into "in" (highest scores) and "out" (lowest): balanced,
#: all "in", all "out". The informative side depends on the task: with two labels, a canary never
#: trained on still gets a low loss half the time (the model's guess matches its random label), so
#: only the high-loss "out" guesses are reliable. Choosing the best (r, split) after the fact is
#: corrected for (Bonferroni over both grids); without it, correct DP runs got ~3x bounds.
SPLITS: tuple[float, ...] = (0.5, 1.0, 0.0)  # fraction of the r guesses that say "in"

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


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


# --------------------------------------------------------------------------- one-run canary audit


def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Largest probability that (epsilon, delta)-DP allows for ``v`` or more correct guesses.

    Steinke et al. 2023 (Theorem 3.1 with abstentions): with ``m`` canaries each included with
    probability 1/2 and ``r`` guesses, q = e^eps / (1 + e^eps) and f(v) = P[Bin(r, q) >= v],

        P[V >= v] <= f(v) + 2 m delta max_{1 <= i <= v} (f(v - i) - f(v)) / i.

    The delta term is kept: dropping it (as one public port does) makes the bound optimistic.

    Example:
        >>> round(one_run_p_value(m=1000, r=100, v=75, epsilon=0.0, delta=1e-4), 4)  # 75/100 right: unlikely at eps 0
        0.0058
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m. Found v={v}, r={r}, m={m}.")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1]. Found epsilon={epsilon}, delta={delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    if v == 0:
        return tail
    i = np.arange(1, v + 1)
    below = np.cumsum(binom.pmf(v - i, r, q))  # f(v - i) - f(v) = P[v - i <= Bin < v]
    return min(1.0, tail + 2 * m * delta * float(np.max(below / i)))


def one_run_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """Largest epsilon that ``v`` correct out of ``r`` guesses refute at ``confidence`` (0 if none).

    Pinned against Steinke et al.'s worked examples (see tests): m=1000, r=100, v=75,
    delta=1e-4 gives 0.673; m=1e5, r=1510, v=1439, delta=1e-5 gives 2.675.
    """
    alpha = 1.0 - confidence
    if one_run_p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) <= alpha and hi < 100:
        lo, hi = hi, 2 * hi
    for _ in range(60):  # the p-value grows with epsilon: bisect
        mid = (lo + hi) / 2
        if one_run_p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def _guess_counts(m: int) -> list[int]:
    """The pre-registered numbers of guesses for ``m`` canaries (even, at least 2, distinct)."""
    return sorted({max(2, 2 * int(f * m / 2)) for f in GUESS_GRID if max(2, 2 * int(f * m / 2)) <= m})


def one_run_ceiling(m: int, *, delta: float, confidence: float = 0.95) -> float:
    """The largest bound ``m`` canaries can give (every guess right, after the grid correction).

    A claim at or above it can be neither confirmed nor refuted: the honest verdict is INCONCLUSIVE.
    """
    counts = _guess_counts(m)
    level = 1 - (1 - confidence) / (len(counts) * len(SPLITS))
    return max(one_run_epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=level) for r in counts)


@dataclass(frozen=True)
class CanaryAudit:
    canaries: int
    included: int
    guesses: int
    guesses_in: int
    correct: int
    epsilon_lower_bound: float
    ceiling: float


def canary_audit(scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95) -> CanaryAudit:
    """Guess each canary's inclusion from its score (higher = more likely included); bound epsilon.

    For each pre-registered r and split, the highest scores are guessed "in" and the lowest "out"
    (see :data:`SPLITS`); the bound is Bonferroni-corrected over every (r, split), and the best
    is reported.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if len(s) != len(inc) or len(s) < 2:
        raise ValueError(f"need one score per canary and at least 2 canaries. Found {len(s)} scores, {len(inc)} flags.")
    m = len(s)
    counts = _guess_counts(m)
    level = 1 - (1 - confidence) / (len(counts) * len(SPLITS))
    order = np.argsort(-s, kind="mergesort")
    best = (0.0, counts[0], counts[0] // 2, 0)
    for r in counts:
        for split in SPLITS:
            k_in = int(round(r * split))
            guessed_in, guessed_out = order[:k_in], order[m - (r - k_in):]
            v = int(inc[guessed_in].sum() + (~inc[guessed_out]).sum())
            lb = one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=level)
            if lb > best[0]:
                best = (lb, r, k_in, v)
    return CanaryAudit(
        canaries=m, included=int(inc.sum()), guesses=best[1], guesses_in=best[2], correct=best[3],
        epsilon_lower_bound=best[0], ceiling=one_run_ceiling(m, delta=delta, confidence=confidence),
    )


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class AuditResult:
    """Every figure of the audit; counts and statistics only, never a record."""

    claimed_epsilon: float
    delta: float
    verdict: str
    passed: bool
    reasons: tuple[str, ...]
    canaries: int
    canaries_included: int
    canary_guesses: int
    canary_guesses_in: int
    canary_correct: int
    canary_epsilon_lower_bound: float
    canary_ceiling: float
    #: Membership inference on the canaries (members: the included ones). AUC and TPRs are None
    #: when every canary fell on one side (then there is nothing to compare).
    mia_auc: Optional[float]
    mia_tpr_at_1pct_fpr: Optional[float]
    mia_tpr_at_01pct_fpr: Optional[float]
    mia_epsilon_lower_bound: float
    accountant_epsilon: float
    cross_check_epsilon: float
    cross_check_ok: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def run_audit(
    *,
    canary_scores: Sequence[float],
    canary_included: Sequence[bool],
    mechanism: SubsampledGaussian,
    delta: float,
    rel_tolerance: float = 1e-6,
) -> AuditResult:
    """Run the three checks and decide the verdict (see the module docstring).

    Only canaries are scored: a real record's score is a non-private statistic of private data,
    and nothing computed from one may be released (or gate without being charged).

    Args:
        canary_scores: one score per canary, higher = more likely trained on (the DP model's -loss).
        canary_included: whether each canary was in the training data (the auditor's secret).
        mechanism: the mechanism actually run (steps run, not planned); its epsilon is the claim.
        rel_tolerance: largest relative difference tolerated between the two accountants.
    """
    scores = np.asarray(canary_scores, dtype=float)
    inc = np.asarray(canary_included, dtype=bool)
    members, non_members = scores[inc], scores[~inc]
    ours, theirs = cross_check_epsilon(mechanism, delta=delta)
    ok = math.isclose(ours, theirs, rel_tol=rel_tolerance, abs_tol=1e-12)
    mia_lb = epsilon_lower_bound(members, non_members, delta=delta)
    both_sides = len(members) > 0 and len(non_members) > 0
    canary = canary_audit(scores, inc, delta=delta)
    reasons = []
    if canary.epsilon_lower_bound > ours:
        reasons.append(
            f"canary audit: epsilon lower bound {canary.epsilon_lower_bound:.3f} ({canary.correct} of "
            f"{canary.guesses} guesses right, {canary.canaries} canaries) exceeds the claimed epsilon {ours:.3f}"
        )
    if mia_lb > ours:
        reasons.append(f"membership-inference lower bound {mia_lb:.3f} (canaries) exceeds the claimed epsilon {ours:.3f}")
    if not ok:
        reasons.append(f"accounting cross-check mismatch: dpops {ours:.6f} vs dp_accounting {theirs:.6f}")
    if reasons:
        verdict = FAIL
    elif ours >= canary.ceiling:
        verdict = INCONCLUSIVE
        reasons.append(
            f"claimed epsilon {ours:.3f} is at or above {canary.ceiling:.3f}, the most {canary.canaries} canaries "
            "can refute: the audit can neither confirm nor refute it"
        )
    else:
        verdict = PASS
    return AuditResult(
        claimed_epsilon=ours, delta=delta, verdict=verdict, passed=verdict == PASS, reasons=tuple(reasons),
        canaries=canary.canaries, canaries_included=canary.included, canary_guesses=canary.guesses,
        canary_guesses_in=canary.guesses_in, canary_correct=canary.correct, canary_epsilon_lower_bound=canary.epsilon_lower_bound,
        canary_ceiling=canary.ceiling,
        mia_auc=auc(members, non_members) if both_sides else None,
        mia_tpr_at_1pct_fpr=tpr_at_fpr(members, non_members, 0.01) if both_sides else None,
        mia_tpr_at_01pct_fpr=tpr_at_fpr(members, non_members, 0.001) if both_sides else None,
        mia_epsilon_lower_bound=mia_lb, accountant_epsilon=ours, cross_check_epsilon=theirs, cross_check_ok=ok,
    )
