"""Audit (stage 8): canary audits that can fail a run, an accounting cross-check, figures only.

Every figure here is computed from synthetic canaries and from what the run released (the DP
weights, the released noisy sums); no real record, training or hold-out, is scored.

* **White-box gradient canaries** (Steinke, Nasr & Jagielski 2023; Nasr et al. 2023; Andrew et
  al. 2024). dpops owns the DP step, so ``audit.gradient_canaries`` Dirac canaries are added to
  the clipped sum before noise: each is included with probability 1/2 (fresh randomness) and then
  Poisson-sampled at q on every step like a record, adding exactly C at its own coordinate
  (:mod:`dpops.assess.canaries`, :mod:`dpops.train.canary_probe`). The trainer keeps the released noisy sum at every
  canary coordinate (``observations``, units of C). Two tests read them:
  - the one-run bound on likelihood-ratio scores (:func:`white_box_scores`: the log-likelihood
    ratio of "sampled at q on each step" against "never there", under the *claimed* sigma), guessing
    "in" for the highest scores only: an included canary that was never sampled left no trace, so
    only "in" guesses can be informed;
  - a **noise check** (:func:`noise_check`): under the claim the released coordinate is the clipped
    sum plus N(0, sigma^2) drawn fresh each step, so the sum of squared observations is
    stochastically at least sigma^2 chi^2 with one degree of freedom per observation, whatever the
    gradients are. An observed sum too small for that refutes the claimed noise outright.
* **Black-box input canaries** (:mod:`dpops.assess.canaries`): random-word records with a random label,
  each trained on with probability 1/2, scored after training as (loss under the base model) minus
  (loss under the fine-tuned model): calibrated against the base model (Carlini et al. 2022), not
  the raw loss. The one-run bound with a pre-registered grid of "in" and "out" guesses.
* **Accounting cross-check**: the epsilon of the mechanism the trainer reports it ran (its own
  record of sigma, q and steps) by Google's ``dp_accounting``, against dpops's epsilon of the
  ledger charge at the steps run; and the trainer's figures must be the charge's.

The statistics (the one-run bound, the ceilings a plan lets an audit reach, under Poisson sampling
where most included canaries are never sampled, and the accountant cross-check) are
:mod:`dpops.assess.bounds`.

Verdict (:func:`run_audit`): FAIL when a one-run lower bound exceeds the claimed epsilon, the noise
check refutes the claimed noise, the trainer's mechanism is not the charge's, or the accountants
disagree; INCONCLUSIVE when the claim is at or above every audit's reachable ceiling
(:func:`dpops.assess.bounds.reachable_ceiling`); PASS otherwise. The FAIL tests share the 5 % false-alarm budget (Bonferroni over the tests run), and
each bound is valid for one run of one model: the one-run theorem needs no independence between a
model's canaries. The membership-inference figures on the canaries (AUC, TPR, a Clopper-Pearson
bound that treats one model's canaries as independent trials, which they are not) are reported as
heuristics and never decide. A PASS is evidence against gross bugs (noise missing or far too small,
sampling mismatch), never proof of the claim. The plan stage refuses, before anything is charged, a
job whose planned claim would be INCONCLUSIVE, unless the policy accepts that verdict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
from scipy.stats import chi2

from dpops.assess.bounds import (
    FALSE_ALARM,
    auc,
    audit_tests,
    dp_accounting_epsilon,
    dp_accounting_orders,
    epsilon_lower_bound,
    guess_cells,
    one_run_ceiling,
    one_run_epsilon_lower_bound,
    reachable_ceiling,
    tpr_at_fpr,
)
from dpops.privacy import accounting
from dpops.privacy.accounting import SubsampledGaussian

PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"


# --------------------------------------------------------------------------- one-run canary audit


@dataclass(frozen=True)
class CanaryAudit:
    canaries: int
    included: int
    guesses: int
    guesses_in: int
    correct: int
    epsilon_lower_bound: float
    ceiling: float
    #: The run's canary outcomes for pooling across runs: ``{"canaries", "cells": [[r, v], ...],
    #: "confusion": {TP, FP, TN, FN}}`` ("in" guesses only; see :mod:`dpops.assess.pooling`).
    outcomes: dict[str, Any] = field(default_factory=dict)


def _outcomes(order: np.ndarray, inc: np.ndarray, counts: Sequence[int], k: int) -> dict[str, Any]:
    """The "in" guess cells and the confusion matrix of the top ``k`` scores (pre-registered)."""
    cells = [[int(r), int(inc[order[:r]].sum())] for r in counts]
    flagged = np.zeros(len(inc), dtype=bool)
    flagged[order[:k]] = True
    return {"canaries": int(len(inc)), "cells": cells, "confusion": {
        "TP": int((flagged & inc).sum()), "FP": int((flagged & ~inc).sum()),
        "TN": int((~flagged & ~inc).sum()), "FN": int((~flagged & inc).sum())}}


def canary_audit(
    scores: Sequence[float], included: Sequence[bool], *, delta: float, confidence: float = 0.95,
    sample_rate: float = 1.0, steps: int = 1, white_box: bool = False,
) -> CanaryAudit:
    """Guess each canary's inclusion from its score (higher = more likely included); bound epsilon.

    Black-box (default): for each pre-registered r and split, the highest scores are guessed "in"
    and the lowest "out" (see :data:`SPLITS`). White-box: "in" guesses only, at the counts the plan
    fixes (:func:`plan_guess_counts`). The bound is Bonferroni-corrected over every cell, and the
    best is reported, with the ceiling the plan (``sample_rate``, ``steps``) lets it reach.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    if len(s) != len(inc) or len(s) < 2:
        raise ValueError(f"need one score per canary and at least 2 canaries. Found {len(s)} scores, {len(inc)} flags.")
    if not np.all(np.isfinite(s)):
        raise ValueError("every canary score must be finite")
    m = len(s)
    cells = guess_cells(m, sample_rate=sample_rate, steps=steps, white_box=white_box)
    counts = sorted({r for r, _ in cells})
    level = 1 - (1 - confidence) / len(cells)
    order = np.argsort(-s, kind="mergesort")
    best = (0.0, cells[0][0], cells[0][1], 0)
    for r, k_in in cells:
        guessed_in, guessed_out = order[:k_in], order[m - (r - k_in):]
        v = int(inc[guessed_in].sum() + (~inc[guessed_out]).sum())
        lb = one_run_epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=level)
        if lb > best[0]:
            best = (lb, r, k_in, v)
    ceiling = reachable_ceiling(m, sample_rate=sample_rate, steps=steps, delta=delta, confidence=confidence, white_box=white_box)
    return CanaryAudit(
        canaries=m, included=int(inc.sum()), guesses=best[1], guesses_in=best[2], correct=best[3],
        epsilon_lower_bound=best[0], ceiling=ceiling,
        # the confusion matrix flags the top 3/4 of the expected sampled canaries (white-box), the top half (black-box)
        outcomes=_outcomes(order, inc, counts, max(counts) if white_box else m // 2),
    )


# --------------------------------------------------------------------------- white-box scoring


#: Fewest steps for which :func:`white_box_scores` standardises each coordinate by its median and spread.
ROBUST_STEPS = 20


def white_box_scores(observations: np.ndarray, *, noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Each gradient canary's log-likelihood ratio, from the released noisy sums at its coordinate.

    ``observations[t, j]`` is the released sum at canary j's coordinate on step t, in units of C.
    Under the claim it is (the clipped real sum there) + N(0, sigma^2), plus 1 on the steps an
    included canary was sampled (probability q each). Per step, the ratio of "included" (a
    mixture: 1 - q of the plain noise, q shifted by 1) to "excluded" is
    1 - q + q exp((x - 1/2) / sigma^2); the score sums its log over the steps. It is computed under
    the *claimed* sigma and q: the test is of the claim, not of what the run did.

    The real gradients' share differs between coordinates (a classifier head's weights get a large
    one, which moves from step to step), while a canary shows on one step or two. With at least
    :data:`ROBUST_STEPS` steps each coordinate is therefore first centred on its median over the
    steps and rescaled so that its robust spread (1.4826 x the median absolute deviation) reads as
    the claimed sigma: under the claim that changes little (the noise dominates the spread), and in
    a run with less noise than claimed a quiet coordinate's canary stands out instead of drowning
    among busy coordinates (on the raw sums of a noise-free run, busy head coordinates took some of
    the top guesses; tests/test_audit_power.py plays that case). Any
    function of the released sums is a valid score for the one-run bound; this one only makes it
    stronger.
    """
    x = np.asarray(observations, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"observations must be [steps, canaries]. Found shape {x.shape}.")
    if not (noise_multiplier > 0 and 0 < sample_rate <= 1):
        raise ValueError(f"need sigma > 0 and 0 < q <= 1. Found sigma={noise_multiplier}, q={sample_rate}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("every observation must be finite")
    if len(x) >= ROBUST_STEPS:
        center = np.median(x, axis=0, keepdims=True)
        spread = 1.4826 * np.median(np.abs(x - center), axis=0, keepdims=True)
        x = (x - center) * (noise_multiplier / np.maximum(spread, 1e-3 * noise_multiplier))
    log_stay = math.log1p(-sample_rate) if sample_rate < 1 else -math.inf
    per_step = np.logaddexp(log_stay, math.log(sample_rate) + (x - 0.5) / noise_multiplier**2)
    return per_step.sum(axis=0)


@dataclass(frozen=True)
class NoiseCheck:
    """The noise the released sums carry at the canary coordinates, against the claimed sigma."""

    observations: int
    #: Upper confidence bound on the noise multiplier the run added (units of C): the released sum
    #: is the noise plus a signal independent of it, which only adds power.
    noise_multiplier_upper: float
    p_value: float
    refuted: bool


def noise_check(observations: np.ndarray, coordinates: Optional[Sequence[int]], *, noise_multiplier: float,
                alpha: float) -> NoiseCheck:
    """Test "the released sums carry Gaussian noise of std sigma C" on the canary coordinates.

    On step t, given everything before it (and which canaries it samples), each released coordinate
    is a fixed value plus fresh N(0, sigma^2) noise (units of C), independent across coordinates.
    (c + N)^2 is stochastically larger than N^2 for every c, so the sum S of the squared
    observations is stochastically at least sigma^2 chi^2_k, k = steps x distinct coordinates,
    however the gradients depend on the past. The p-value P[sigma^2 chi^2_k <= S] is therefore
    valid whatever the data; a small one refutes the claimed noise. Coordinates shared by two
    canaries (only when there are more canaries than trainable weights) are counted once.
    """
    x = np.asarray(observations, dtype=float)
    if coordinates is not None:
        _, first = np.unique(np.asarray(coordinates), return_index=True)
        x = x[:, np.sort(first)]
    k = int(x.size)
    if k == 0:
        return NoiseCheck(observations=0, noise_multiplier_upper=math.inf, p_value=1.0, refuted=False)
    total = float(np.sum(x * x))
    p_value = float(chi2.cdf(total / noise_multiplier**2, k))
    upper = math.sqrt(total / float(chi2.ppf(alpha, k)))
    return NoiseCheck(observations=k, noise_multiplier_upper=upper, p_value=p_value, refuted=p_value < alpha)


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class AuditResult:
    """Every figure of the audit; counts and statistics only, never a record."""

    claimed_epsilon: float
    delta: float
    verdict: str
    passed: bool
    reasons: tuple[str, ...]
    #: Which test decided: for FAIL the first that refuted the claim; for PASS and INCONCLUSIVE
    #: the audit with the highest reachable ceiling (the one that could have refuted most).
    decided_by: str
    #: The highest ceiling any audit of this run could reach given the plan (INCONCLUSIVE at or above).
    ceiling: float
    # black-box input canaries
    canaries: int
    canaries_included: int
    canary_guesses: int
    canary_guesses_in: int
    canary_correct: int
    canary_epsilon_lower_bound: float
    #: What the black-box audit could reach given q and steps (a perfect memoriser's bound).
    canary_ceiling: float
    #: ... and what it could reach if every included canary were detectable (q = 1), for reference.
    canary_all_detected_ceiling: float
    canary_scoring: str
    #: Membership inference on the canaries (members: the included ones). AUC and TPRs are None
    #: when every canary fell on one side. Heuristics: reported, never deciding.
    mia_auc: Optional[float]
    mia_tpr_at_1pct_fpr: Optional[float]
    mia_tpr_at_01pct_fpr: Optional[float]
    mia_epsilon_lower_bound: float
    accountant_epsilon: float
    cross_check_epsilon: float
    cross_check_ok: bool
    #: The mechanism the trainer reports it ran (sigma, q, steps), which the cross-check accounts.
    trained_noise_multiplier: float
    trained_sample_rate: float
    trained_steps: int
    # white-box gradient canaries (0 / None without them)
    white_box_canaries: int = 0
    white_box_included: int = 0
    white_box_guesses: int = 0
    white_box_correct: int = 0
    white_box_epsilon_lower_bound: float = 0.0
    white_box_ceiling: float = 0.0
    noise_multiplier_upper: Optional[float] = None
    noise_p_value: Optional[float] = None
    #: The canary outcomes of this run, kept in the ledger for pooling (:mod:`dpops.assess.pooling`).
    outcomes: dict[str, Any] = field(default_factory=dict)
    #: The mechanism claimed (the charge's), with which runs are pooled.
    mechanism: dict[str, Any] = field(default_factory=dict)

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
    trained: Optional[SubsampledGaussian] = None,
    max_grad_norm: Optional[float] = None,
    trained_max_grad_norm: Optional[float] = None,
    white_box_observations: Optional[np.ndarray] = None,
    white_box_included: Optional[Sequence[bool]] = None,
    white_box_coordinates: Optional[Sequence[int]] = None,
    canary_scoring: str = "-loss",
    rel_tolerance: float = 1e-6,
) -> AuditResult:
    """Run the checks and decide the verdict (see the module docstring).

    Only canaries are scored: a real record's score is a non-private statistic of private data,
    and nothing computed from one may be released (or gate without being charged).

    Args:
        canary_scores: one score per input canary, higher = more likely trained on.
        canary_included: whether each input canary was in the training data (the auditor's secret).
        mechanism: the mechanism charged, at the steps run; its epsilon is the claim.
        trained: the mechanism the trainer reports it ran (its own sigma, q, steps); None: ``mechanism``.
        max_grad_norm, trained_max_grad_norm: the clipping bound charged and the one the trainer reports.
        white_box_observations: [steps, m] released noisy sums at the gradient canaries' coordinates
            (units of C), with ``white_box_included`` and ``white_box_coordinates``; None: no white-box audit.
        canary_scoring: how ``canary_scores`` were computed (reported).
        rel_tolerance: largest relative difference tolerated between the two accountants.
    """
    trained = trained or mechanism
    scores = np.asarray(canary_scores, dtype=float)
    inc = np.asarray(canary_included, dtype=bool)
    members, non_members = scores[inc], scores[~inc]
    ours = accounting.epsilon([mechanism], delta=delta)
    theirs = dp_accounting_epsilon(trained, delta=delta)
    ok = math.isclose(ours, theirs, rel_tol=rel_tolerance, abs_tol=1e-12)
    if not ok and ours < theirs:  # dp_accounting drops the orders where its series diverges; compare on the rest
        same = accounting.epsilon([mechanism], delta=delta, orders=dp_accounting_orders(trained))
        ok = math.isclose(same, theirs, rel_tol=rel_tolerance, abs_tol=1e-12)
    q, steps = mechanism.sample_rate, int(mechanism.steps)
    white = white_box_observations is not None and np.asarray(white_box_observations).shape[1] >= 2
    alpha = FALSE_ALARM / audit_tests(np.asarray(white_box_observations).shape[1] if white else 0)
    canary = canary_audit(scores, inc, delta=delta, confidence=1 - alpha, sample_rate=q, steps=steps)
    failed: list[tuple[str, str]] = []  # (decided_by, reason)
    if canary.epsilon_lower_bound > ours:
        failed.append(("black-box canaries", (
            f"black-box canary audit: epsilon lower bound {canary.epsilon_lower_bound:.3f} ({canary.correct} of "
            f"{canary.guesses} guesses right, {canary.canaries} canaries) exceeds the claimed epsilon {ours:.3f}")))
    wb: Optional[CanaryAudit] = None
    noise: Optional[NoiseCheck] = None
    if white:
        obs = np.asarray(white_box_observations, dtype=float)
        wb_scores = white_box_scores(obs, noise_multiplier=mechanism.noise_multiplier, sample_rate=q)
        wb = canary_audit(wb_scores, np.asarray(white_box_included, dtype=bool), delta=delta, confidence=1 - alpha,
                          sample_rate=q, steps=steps, white_box=True)
        noise = noise_check(obs, white_box_coordinates, noise_multiplier=mechanism.noise_multiplier, alpha=alpha)
        if wb.epsilon_lower_bound > ours:
            failed.insert(0, ("white-box canaries", (
                f"white-box canary audit: epsilon lower bound {wb.epsilon_lower_bound:.3f} ({wb.correct} of "
                f"{wb.guesses} 'in' guesses right, {wb.canaries} gradient canaries) exceeds the claimed epsilon {ours:.3f}")))
        if noise.refuted:
            failed.insert(0, ("white-box noise check", (
                f"white-box noise check: the released sums carry noise of at most {noise.noise_multiplier_upper:.3f} C "
                f"at the canary coordinates ({1 - alpha:.1%} upper bound, {noise.observations} observations, p = "
                f"{noise.p_value:.2g}), below the claimed noise multiplier {mechanism.noise_multiplier:.3f}")))
    mismatch = _mechanism_differences(mechanism, trained, max_grad_norm, trained_max_grad_norm)
    if mismatch:
        failed.append(("accountant cross-check", "the trainer's record differs from the charge: " + "; ".join(mismatch)))
    if not ok:
        failed.append(("accountant cross-check", f"accounting cross-check mismatch: dpops {ours:.6f} (the charge) vs "
                                                 f"dp_accounting {theirs:.6f} (the mechanism the trainer ran)"))
    ceilings = {"black-box canaries": canary.ceiling, **({"white-box canaries": wb.ceiling} if wb else {})}
    strongest = max(ceilings, key=ceilings.get)
    ceiling = ceilings[strongest]
    reasons = [r for _, r in failed]
    if failed:
        verdict, decided_by = FAIL, failed[0][0]
    elif ours >= ceiling:
        verdict, decided_by = INCONCLUSIVE, strongest
        reasons.append(
            f"claimed epsilon {ours:.3f} is at or above {ceiling:.3f}, the most the audit could refute at q = {q:.3g} "
            f"over {steps} steps (the {strongest}, if the run memorised every canary it sampled): the audit can "
            "neither confirm nor refute it")
    else:
        verdict, decided_by = PASS, strongest
    outcomes = {"black_box": canary.outcomes, "white_box": wb.outcomes if wb else None}
    return AuditResult(
        claimed_epsilon=ours, delta=delta, verdict=verdict, passed=verdict == PASS, reasons=tuple(reasons),
        decided_by=decided_by, ceiling=ceiling,
        canaries=canary.canaries, canaries_included=canary.included, canary_guesses=canary.guesses,
        canary_guesses_in=canary.guesses_in, canary_correct=canary.correct, canary_epsilon_lower_bound=canary.epsilon_lower_bound,
        canary_ceiling=canary.ceiling, canary_all_detected_ceiling=one_run_ceiling(canary.canaries, delta=delta, confidence=1 - alpha),
        canary_scoring=canary_scoring,
        mia_auc=auc(members, non_members) if len(members) and len(non_members) else None,
        mia_tpr_at_1pct_fpr=tpr_at_fpr(members, non_members, 0.01) if len(members) and len(non_members) else None,
        mia_tpr_at_01pct_fpr=tpr_at_fpr(members, non_members, 0.001) if len(members) and len(non_members) else None,
        mia_epsilon_lower_bound=epsilon_lower_bound(members, non_members, delta=delta),
        accountant_epsilon=ours, cross_check_epsilon=theirs, cross_check_ok=ok and not mismatch,
        trained_noise_multiplier=float(trained.noise_multiplier), trained_sample_rate=float(trained.sample_rate),
        trained_steps=int(trained.steps),
        white_box_canaries=wb.canaries if wb else 0, white_box_included=wb.included if wb else 0,
        white_box_guesses=wb.guesses if wb else 0, white_box_correct=wb.correct if wb else 0,
        white_box_epsilon_lower_bound=wb.epsilon_lower_bound if wb else 0.0, white_box_ceiling=wb.ceiling if wb else 0.0,
        noise_multiplier_upper=noise.noise_multiplier_upper if noise else None, noise_p_value=noise.p_value if noise else None,
        outcomes=outcomes,
        mechanism={"noise_multiplier": float(mechanism.noise_multiplier), "sample_rate": float(q), "steps": steps,
                   "max_grad_norm": None if max_grad_norm is None else float(max_grad_norm), "delta": float(delta)},
    )


def _mechanism_differences(charged: SubsampledGaussian, trained: SubsampledGaussian, max_grad_norm: Optional[float],
                           trained_max_grad_norm: Optional[float]) -> list[str]:
    """Where the trainer's own record (sigma, q, steps, C) differs from the charge's."""
    out = []
    if max_grad_norm is not None and trained_max_grad_norm is not None and not math.isclose(
            float(max_grad_norm), float(trained_max_grad_norm), rel_tol=1e-9, abs_tol=0.0):
        out.append(f"clipping bound {trained_max_grad_norm!r} trained, {max_grad_norm!r} charged")
    for name, a, b in (("noise multiplier", charged.noise_multiplier, trained.noise_multiplier),
                       ("sample rate", charged.sample_rate, trained.sample_rate)):
        if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0):
            out.append(f"{name} {b!r} trained, {a!r} charged")
    if int(charged.steps) != int(trained.steps):
        out.append(f"steps {trained.steps} trained, {charged.steps} charged")
    return out
