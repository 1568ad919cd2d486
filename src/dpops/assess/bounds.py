"""The statistics of the audit: one-run epsilon lower bounds, their ceilings, the accountant cross-check.

Pure functions of counts and scores, with no model and no record:

* membership-inference figures on scores (:func:`auc`, :func:`tpr_at_fpr`, the Clopper-Pearson
  :func:`epsilon_lower_bound`): heuristics, reported and never deciding;
* the one-run theorem of Steinke, Nasr & Jagielski 2023 (:func:`one_run_p_value`,
  :func:`one_run_epsilon_lower_bound`) over pre-registered guess grids (:data:`GUESS_GRID`,
  :data:`SPLITS`, :func:`guess_cells`);
* what an audit can reach given the plan (:func:`reachable_ceiling`, :func:`planned_ceiling`), with
  the false-alarm budget shared by its FAIL tests (:data:`FALSE_ALARM`, :func:`audit_tests`);
* Google ``dp_accounting``'s epsilon of a mechanism, against dpops's (:func:`cross_check_epsilon`).

**Power.** Under Poisson sampling an included canary is ever sampled with probability
1 - (1 - q)^T (0.23 at the demo's q = 1.75e-3 over 150 steps): the rest are indistinguishable from
excluded canaries, even in a run that memorises perfectly. The ceiling reported and used for
INCONCLUSIVE (:func:`reachable_ceiling`) is therefore the bound a perfectly memorising run would
reach with the expected number of sampled canaries, not the all-correct ceiling of m canaries
(which overstated the demo's audit: 5.12 reported, 2.79 reachable). The white-box guess counts are
pre-registered from the plan as fractions of that expected number (:func:`plan_guess_counts`).

The audit itself (the canaries' guesses, the white-box scores, the noise check, the verdict) is
:mod:`dpops.assess.audit`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.stats import beta, binom

from dpops.privacy import accounting
from dpops.privacy.accounting import SubsampledGaussian

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

#: Total false-alarm budget of the FAIL tests of one audit, split evenly across the tests run.
FALSE_ALARM = 0.05


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


def dp_accounting_epsilon(mechanism: SubsampledGaussian, *, delta: float) -> float:
    """Google dp_accounting's RDP epsilon of ``mechanism`` over dpops's run orders."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=list(accounting.RDP_ORDERS))
    if mechanism.steps:
        acc.compose(
            dp_accounting.PoissonSampledDpEvent(mechanism.sample_rate, dp_accounting.GaussianDpEvent(mechanism.noise_multiplier)),
            int(mechanism.steps),
        )
    return float(acc.get_epsilon(delta))


def dp_accounting_orders(mechanism: SubsampledGaussian) -> tuple[float, ...]:
    """The run orders at which dp_accounting's series converges for ``mechanism`` (it drops the others)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=list(accounting.RDP_ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(mechanism.sample_rate, dp_accounting.GaussianDpEvent(mechanism.noise_multiplier)), 1)
    return tuple(a for a, r in zip(accounting.RDP_ORDERS, acc.rdp, strict=True) if np.isfinite(r))


def cross_check_epsilon(mechanism: SubsampledGaussian, *, delta: float) -> tuple[float, float]:
    """(dpops's epsilon, Google dp_accounting's RDP epsilon) for the same mechanism and orders."""
    return accounting.epsilon([mechanism], delta=delta), dp_accounting_epsilon(mechanism, delta=delta)


# --------------------------------------------------------------------------- the one-run bound


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
    """The largest bound ``m`` black-box canaries can give when every one of them could be detected
    (every guess right, after the grid correction): the ceiling at q = 1.

    Under Poisson sampling at q < 1 it overstates what the audit can reach; the verdict uses
    :func:`reachable_ceiling`.
    """
    counts = _guess_counts(m)
    level = 1 - (1 - confidence) / (len(counts) * len(SPLITS))
    return max(one_run_epsilon_lower_bound(m=m, r=r, v=r, delta=delta, confidence=level) for r in counts)


# --------------------------------------------------------------------------- power given the plan


def detection_probability(sample_rate: float, steps: int) -> float:
    """Probability that an included canary is sampled on at least one of ``steps`` Poisson steps
    at rate ``sample_rate``: 1 - (1 - q)^T. A canary never sampled left no trace in the run."""
    if not (0 <= sample_rate <= 1 and steps >= 0):
        raise ValueError(f"need 0 <= q <= 1 and steps >= 0. Found q={sample_rate}, steps={steps}.")
    return float(-math.expm1(steps * math.log1p(-sample_rate))) if sample_rate < 1 else float(steps > 0)


#: Pre-registered white-box guess counts, as fractions of the expected number of sampled canaries.
WHITE_BOX_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 0.75)


def plan_guess_counts(m: int, *, sample_rate: float, steps: int) -> list[int]:
    """The white-box audit's "in" guess counts, fixed by the plan before the run: fractions
    :data:`WHITE_BOX_FRACTIONS` of the expected number of included canaries ever sampled
    (m / 2 * :func:`detection_probability`), at least 2, at most m."""
    expected = m / 2 * detection_probability(sample_rate, steps)
    return sorted({min(m, max(2, int(f * expected))) for f in WHITE_BOX_FRACTIONS})


def _expected_correct(m: int, seen: float, r_in: int, r_out: int) -> float:
    """Correct guesses of a perfectly memorising run with ``seen`` detectable canaries (of m/2 included):
    "in" guesses are right on the detectable ones, then at the rate of the undetectable pool, whose
    m - seen canaries hold m/2 - seen included; "out" guesses fall in that pool (m/2 excluded)."""
    pool = m - seen
    in_right = min(r_in, seen) + (max(0, r_in - seen) * (m / 2 - seen) / pool if pool > 0 else 0.0)
    out_right = r_out * (m / 2) / pool if pool > 0 else 0.0
    return min(r_in + r_out, in_right + out_right)


def guess_cells(m: int, *, sample_rate: float, steps: int, white_box: bool) -> list[tuple[int, int]]:
    """The pre-registered guess cells of an audit, as (r guesses, of which r_in "in"): white-box,
    "in" guesses only at the counts the plan fixes; black-box, every count of the grid with every
    split of :data:`SPLITS`. The bound is Bonferroni-corrected over these cells."""
    if white_box:
        return [(r, r) for r in plan_guess_counts(m, sample_rate=sample_rate, steps=steps)]
    return [(r, int(round(r * split))) for r in _guess_counts(m) for split in SPLITS]


def reachable_ceiling(
    m: int, *, sample_rate: float, steps: int, delta: float, confidence: float = 0.95, white_box: bool = False,
) -> float:
    """The bound a perfectly memorising run reaches given the plan: every sampled canary detected,
    the others indistinguishable, with the expected number sampled (m / 2 x
    :func:`detection_probability`), over the same pre-registered guesses and correction the audit
    uses. A claim at or above it can be neither confirmed nor refuted by that audit.

    Example (the demo before this audit: 1,000 input canaries, q = 1.9e-3, 150 steps): about 2.8,
    not the 5.78 of m canaries all detected.
    """
    seen = m / 2 * detection_probability(sample_rate, steps)
    cells = guess_cells(m, sample_rate=sample_rate, steps=steps, white_box=white_box)
    level = 1 - (1 - confidence) / len(cells)
    best = 0.0
    for r, r_in in cells:
        v = int(math.floor(_expected_correct(m, seen, r_in, r - r_in)))
        best = max(best, one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=level))
    return best


def audit_tests(gradient_canaries: int) -> int:
    """How many FAIL tests share the false-alarm budget: the black-box bound, and with at least 2
    gradient canaries the white-box bound and the noise check."""
    return 3 if gradient_canaries >= 2 else 1


def planned_ceiling(canaries: int, gradient_canaries: int, *, sample_rate: float, steps: int, delta: float) -> tuple[float, str]:
    """(the highest ceiling the run's audits could reach given the plan, which audit), with the same
    confidence levels :func:`run_audit` uses, so that plan and audit agree on INCONCLUSIVE."""
    level = 1 - FALSE_ALARM / audit_tests(gradient_canaries)
    ceilings = {"black-box canaries": reachable_ceiling(canaries, sample_rate=sample_rate, steps=steps, delta=delta,
                                                        confidence=level)}
    if gradient_canaries >= 2:
        ceilings["white-box canaries"] = reachable_ceiling(gradient_canaries, sample_rate=sample_rate, steps=steps,
                                                           delta=delta, confidence=level, white_box=True)
    strongest = max(ceilings, key=ceilings.get)
    return ceilings[strongest], strongest
