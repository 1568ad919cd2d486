"""Pooled audit evidence across the recurring runs of one mechanism.

One run's canaries can refute only a claim below its ceiling (:func:`dpops.assess.bounds.one_run_ceiling`):
with a few thousand canaries, a claim of eps = 8 is never refutable, however broken the run. The
runs of a recurring job repeat the same mechanism, so their canaries can be pooled:

* **Pooled one-run bound** (Steinke, Nasr & Jagielski 2023, "Privacy auditing with one (1)
  training run"). Every run draws fresh canaries, each included independently with probability
  1/2 (fresh ``secrets`` randomness, never the job seed). Take the K runs' joint output as one
  mechanism. With respect to one canary it is (eps, delta)-DP: only that canary's own run saw it,
  and the other runs are independent of its inclusion, so they are post-processing (with fresh
  independent randomness) of nothing that depends on it. The one-run theorem therefore applies to
  all ``M = sum m`` canaries at once, the guesses being each run's own pre-registered guesses:
  for cell index ``c``, ``r = sum_k r_k[c]`` guesses of which ``v = sum_k v_k[c]`` were right.
  The best cell is reported, Bonferroni-corrected over the cells (as :func:`dpops.assess.audit.canary_audit`
  does for one run). Cells are pooled by index, so every pooled run must have the same list of
  guess counts ``r`` (the same mechanism and canary count pre-register the same list); a run with
  another list is skipped and counted. Which list is the reference (the most common one, ties to
  the earliest run) depends only on the pre-registered ``r``, never on a ``v``: nothing is chosen
  after seeing the outcomes.

  Pooling does not always help: the theorem's delta term grows with the number of canaries
  (``2 M delta``), so the ceiling (:attr:`PooledEvidence.ceiling`) rises with ``M`` only while ``M delta``
  is small, then falls. Measured (``one_run_ceiling``, 95%): at delta 1e-5 it is 4.96 for 1000
  canaries, 5.32 for 2000, 5.17 for 10 000 and 5.02 for 100 000; at delta 1e-6, 5.12, 5.80, 7.27
  (10 000), 7.63 (20 000), then 7.48 (100 000). ``dataset_pool(max_runs=)`` pools only the most
  recent runs; choosing it from ``M`` and delta (never from the outcomes) keeps the bound valid.
* **Bayesian interval** (Zanella-Beguelin et al. 2023, "Bayesian estimation of differential
  privacy"), from the summed confusion counts, via Microsoft's ``privacy_estimates``. It assumes
  the canaries are exchangeable independent trials of one attack: true across runs (fresh
  canaries, fresh inclusion, independent training), only approximate within one run (one model's
  canaries share its training trajectory). It is an *estimate*, reported beside the bounds; the
  gate never decides on it.

Nothing here scores a record: the inputs are the audit outcomes the ledger holds (counts on
synthetic canaries), and the outputs are counts and epsilons.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional, Sequence

from dpops.assess.bounds import one_run_epsilon_lower_bound

#: Keys of a "mechanism" dict (the evidence's audit dict, issue 17).
MECHANISM_KEYS: tuple[str, ...] = ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta")

#: Relative tolerance of :func:`same_mechanism` on floats: a mechanism read back from what ran
#: goes through float32 / JSON round trips that move the last digits only.
MECHANISM_RTOL = 1e-9

#: Method of the Bayesian interval. The paper's own method, "joint-beta" (a 2-D posterior over
#: (FPR, FNR) integrated over each (eps, delta) region), took 16.2 s on TP=600, FP=30, TN=4400,
#: FN=1900 (6930 canaries, delta 1e-5, alpha 0.05) on this project's 2-core machine, against 1 ms for
#: "jeffreys" (equal-tailed Jeffreys intervals on FPR and FNR, combined by a union bound), with
#: nearly the same interval ((3.22, 3.95) against (3.10, 4.08)). A gate may not wait 16 s per
#: kind and dataset, so "jeffreys" is used; pass ``method="joint-beta"`` to get the paper's.
BAYES_METHOD = "jeffreys"

CONFUSION_KEYS: tuple[str, ...] = ("TP", "FP", "TN", "FN")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def same_mechanism(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two "mechanism" dicts describe the same mechanism.

    Every key of :data:`MECHANISM_KEYS` must be in both (a dict without them describes no
    mechanism: False). ``steps`` must be equal integers; other numbers equal within a relative
    :data:`MECHANISM_RTOL`. Any further key must be in both and equal (numbers within the tolerance),
    so a field added later separates mechanisms instead of being ignored.
    """
    if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
        return False
    if any(k not in a or k not in b for k in MECHANISM_KEYS) or set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if k == "steps":
            if not (_is_int(x) and _is_int(y) and x == y):
                return False
        elif _is_number(x) and _is_number(y):
            if not (math.isfinite(x) and math.isfinite(y) and math.isclose(x, y, rel_tol=MECHANISM_RTOL, abs_tol=0.0)):
                return False
        elif x != y:
            return False
    return True


def check_outcome(record: Any) -> Optional[str]:
    """Why ``record`` is not an audit outcome record (``None`` when it is one).

    A record is ``{"canaries": m, "cells": [[r, v], ...], "confusion": {"TP", "FP", "TN", "FN"}}``
    with ``0 <= v <= r <= m``, at least one cell, and confusion counts that sum to ``m``. The
    reason names the field, never its value.
    """
    if not isinstance(record, Mapping):
        return "the record is not a mapping"
    m = record.get("canaries")
    if not (_is_int(m) and m >= 2):
        return "field 'canaries' must be an integer of at least 2"
    cells = record.get("cells")
    if not (isinstance(cells, Sequence) and not isinstance(cells, str) and len(cells) > 0):
        return "field 'cells' must be a non-empty list of [r, v]"
    for cell in cells:
        if not (isinstance(cell, Sequence) and not isinstance(cell, str) and len(cell) == 2
                and _is_int(cell[0]) and _is_int(cell[1]) and 0 <= cell[1] <= cell[0] <= m):
            return "field 'cells' must hold pairs [r, v] with 0 <= v <= r <= canaries"
    confusion = record.get("confusion")
    if not (isinstance(confusion, Mapping) and all(_is_int(confusion.get(k)) and confusion[k] >= 0 for k in CONFUSION_KEYS)):
        return "field 'confusion' must hold non-negative integers TP, FP, TN, FN"
    if sum(confusion[k] for k in CONFUSION_KEYS) != m:
        return "field 'confusion' must count every canary once (TP + FP + TN + FN = canaries)"
    return None


@dataclass(frozen=True)
class PooledEvidence:
    """The pooled audit of ``runs`` runs: counts and epsilons only.

    ``epsilon_lower_bound`` is rigorous at ``confidence`` (the pooled one-run bound, best cell after
    the Bonferroni correction; ``guesses``/``correct`` are that cell's summed r and v);
    ``ceiling`` is the largest bound these canaries can give (every guess right), so a claim at or
    above it can be neither confirmed nor refuted. ``bayes_epsilon_lo``/``bayes_epsilon_hi`` are
    the two-sided Bayesian interval at ``confidence`` (an estimate that assumes independent
    canaries, see the module docstring; ``hi`` is ``inf`` when unbounded, both ``None`` when it
    cannot be computed: no pooled run, no member or no non-member, or ``privacy_estimates`` missing,
    see ``notes``). ``skipped`` counts the runs left out, by reason.
    """

    runs: int
    canaries: int
    claimed_epsilon: float
    delta: float
    confidence: float
    cells: tuple[tuple[int, int], ...]
    guesses: int
    correct: int
    epsilon_lower_bound: float
    ceiling: float
    exceeds_claim: bool
    confusion: Mapping[str, int]
    bayes_method: str
    bayes_epsilon_lo: Optional[float]
    bayes_epsilon_hi: Optional[float]
    skipped: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def runs_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (strict JSON: an unbounded ``bayes_epsilon_hi`` becomes ``None``)."""
        hi = self.bayes_epsilon_hi
        return {
            "runs": self.runs, "runs_skipped": self.runs_skipped, "skipped": dict(self.skipped),
            "canaries": self.canaries, "claimed_epsilon": self.claimed_epsilon, "delta": self.delta,
            "confidence": self.confidence, "cells": [list(c) for c in self.cells], "guesses": self.guesses,
            "correct": self.correct, "epsilon_lower_bound": self.epsilon_lower_bound, "ceiling": self.ceiling,
            "exceeds_claim": self.exceeds_claim, "confusion": dict(self.confusion), "bayes_method": self.bayes_method,
            "bayes_epsilon_lo": self.bayes_epsilon_lo,
            "bayes_epsilon_hi": None if hi is None or not math.isfinite(hi) else hi,
            "notes": list(self.notes),
        }


def bayes_interval(confusion: Mapping[str, int], *, delta: float, confidence: float = 0.95,
                   method: str = BAYES_METHOD) -> tuple[Optional[float], Optional[float], Optional[str]]:
    """(lo, hi, note): the two-sided interval of Zanella-Beguelin et al. at ``confidence``.

    ``privacy_estimates.compute_eps_lo_hi`` with ``alpha = 1 - confidence`` ("in" = positive:
    TP an included canary guessed "in"). (None, None, why) when the rates are undefined (no
    included or no excluded canary) or the library is missing (``pip install 'dpops[audit]'``).
    """
    tp, fp, tn, fn = (int(confusion[k]) for k in CONFUSION_KEYS)
    if tp + fn == 0 or fp + tn == 0:
        return None, None, "no Bayesian interval: the pooled canaries have no included or no excluded one"
    try:
        from privacy_estimates import AttackResults, compute_eps_lo_hi
    except ImportError:
        return None, None, "no Bayesian interval: privacy-estimates is not installed (pip install 'dpops[audit]')"
    try:
        lo, hi = compute_eps_lo_hi(count=AttackResults(FN=fn, FP=fp, TN=tn, TP=tp), delta=delta, alpha=1.0 - confidence, method=method)
    except (AssertionError, ArithmeticError, ValueError) as exc:  # the library checks itself with assert
        return None, None, f"no Bayesian interval: privacy_estimates failed ({type(exc).__name__})"
    return max(0.0, float(lo)), float(hi), None


def sequential_confidence(look: int, confidence: float = 0.95) -> float:
    """The confidence to test the ``look``-th pooled check (1, 2, ...) at, so that all looks together
    wrongly refute a true claim with probability at most ``1 - confidence``.

    A gate that pools a dataset's runs again after every new run tests the claim once per run, on
    overlapping data: at a fixed 95% per look, a correct mechanism is wrongly failed more and more
    often as runs accumulate. Spending ``alpha_k = (1 - confidence) 6 / (pi^2 k^2)`` on look ``k``
    (the alphas sum to ``1 - confidence``; a union bound, valid whatever the looks' dependence) keeps
    the total at ``1 - confidence``. Use the number of pooled runs as ``look``.

    Example:
        >>> round(sequential_confidence(1), 5), round(sequential_confidence(10), 6)
        (0.9696, 0.999696)
    """
    if not (_is_int(look) and look >= 1):
        raise ValueError("field 'look' must be a positive integer")
    if not (_is_number(confidence) and 0 < confidence < 1):
        raise ValueError("field 'confidence' must be in (0, 1)")
    return 1.0 - (1.0 - confidence) * 6.0 / (math.pi ** 2 * look ** 2)


def pool(outcomes: list[dict], *, claimed_epsilon: float, delta: float, confidence: float = 0.95,
         method: str = BAYES_METHOD) -> PooledEvidence:
    """Pool the audit outcome records of runs of one mechanism (see the module docstring).

    ``outcomes`` are records of one audit kind (``evidence["outcomes"]["white_box"]``, say), one
    per run; the caller vouches that the runs share the mechanism (:func:`dataset_pool` checks
    it). Runs whose list of guess counts differs from the reference list are skipped and counted
    (``skipped["cells_differ"]``).

    Raises:
        ValueError: a record is malformed (the message names the field and the run's index), or
            ``claimed_epsilon``, ``delta``, ``confidence`` are out of range.
    """
    if not (_is_number(claimed_epsilon) and claimed_epsilon >= 0 and math.isfinite(claimed_epsilon)):
        raise ValueError("field 'claimed_epsilon' must be a finite number >= 0")
    if not (_is_number(delta) and 0 <= delta < 1):
        raise ValueError("field 'delta' must be in [0, 1)")
    if not (_is_number(confidence) and 0 < confidence < 1):
        raise ValueError("field 'confidence' must be in (0, 1)")
    for i, rec in enumerate(outcomes):
        why = check_outcome(rec)
        if why is not None:
            raise ValueError(f"outcome record {i}: {why}")
    r_lists = [tuple(int(c[0]) for c in rec["cells"]) for rec in outcomes]
    skipped: dict[str, int] = {}
    kept = list(outcomes)
    if r_lists:
        counts = Counter(r_lists)
        best = max(counts.values())
        reference = next(r for r in r_lists if counts[r] == best)  # most common, ties to the earliest run
        kept = [rec for rec, r in zip(outcomes, r_lists, strict=True) if r == reference]
        if len(kept) < len(outcomes):
            skipped["cells_differ"] = len(outcomes) - len(kept)
    confusion = {k: sum(int(rec["confusion"][k]) for rec in kept) for k in CONFUSION_KEYS}
    if not kept:
        return PooledEvidence(runs=0, canaries=0, claimed_epsilon=float(claimed_epsilon), delta=float(delta),
                              confidence=float(confidence), cells=(), guesses=0, correct=0, epsilon_lower_bound=0.0,
                              ceiling=0.0, exceeds_claim=False, confusion=confusion, bayes_method=method,
                              bayes_epsilon_lo=None, bayes_epsilon_hi=None, skipped=skipped,
                              notes=("no run to pool",))
    m_total = sum(int(rec["canaries"]) for rec in kept)
    n_cells = len(kept[0]["cells"])
    cells = tuple((sum(int(rec["cells"][c][0]) for rec in kept), sum(int(rec["cells"][c][1]) for rec in kept))
                  for c in range(n_cells))
    level = 1.0 - (1.0 - confidence) / n_cells
    bound, guesses, correct = 0.0, cells[0][0], cells[0][1]
    for r, v in cells:
        lb = one_run_epsilon_lower_bound(m=m_total, r=r, v=v, delta=delta, confidence=level)
        if lb > bound:
            bound, guesses, correct = lb, r, v
    ceiling = max(one_run_epsilon_lower_bound(m=m_total, r=r, v=r, delta=delta, confidence=level) for r in sorted({r for r, _ in cells}))
    lo, hi, note = bayes_interval(confusion, delta=delta, confidence=confidence, method=method)
    return PooledEvidence(
        runs=len(kept), canaries=m_total, claimed_epsilon=float(claimed_epsilon), delta=float(delta),
        confidence=float(confidence), cells=cells, guesses=guesses, correct=correct, epsilon_lower_bound=bound,
        ceiling=ceiling, exceeds_claim=bound > claimed_epsilon, confusion=confusion, bayes_method=method,
        bayes_epsilon_lo=lo, bayes_epsilon_hi=hi, skipped=skipped, notes=(note,) if note else (),
    )


def dataset_pool(evidence: list[dict], *, mechanism: dict, kind: str = "white_box", confidence: float = 0.95,
                 method: str = BAYES_METHOD, max_runs: Optional[int] = None, sequential: bool = False) -> PooledEvidence:
    """Pool a dataset's past evidence of ``mechanism`` for the audit ``kind`` ("white_box"/"black_box").

    ``evidence``: the evidence audit dicts, oldest first (an item holding an ``"audit"`` dict and no
    ``"outcomes"``, i.e. a ledger evidence payload as :meth:`dpops.ledger.store.Ledger.evidence_of`
    returns it, is read through its ``"audit"``). An item is pooled when it has ``"outcomes"``,
    ``"mechanism"`` and ``"claimed_epsilon"``, its mechanism is :func:`same_mechanism` as
    ``mechanism``, and ``outcomes[kind]`` is a well-formed record. Every other item is skipped and
    counted by reason: ``no_outcomes`` (evidence written before issue 17), ``other_mechanism``,
    ``no_record`` (e.g. a run without gradient canaries has no white-box record), ``malformed``;
    :func:`pool` adds ``cells_differ``. With ``max_runs``, only the most recent ``max_runs`` of the
    poolable runs are pooled (the older ones are counted as ``older``).

    The claim tested is the largest claim among the pooled runs: if every run is eps_k-DP, the joint
    output is max_k eps_k-DP with respect to each canary (same mechanism: the claims agree anyway).
    ``delta`` is the mechanism's. With ``sequential``, this pool is taken as the k-th look at the
    dataset's evidence, k the number of poolable runs, and ``confidence`` is spent over the looks
    (:func:`sequential_confidence`).
    """
    if not (isinstance(mechanism, Mapping) and all(k in mechanism for k in MECHANISM_KEYS)):
        raise ValueError(f"field 'mechanism' must hold {list(MECHANISM_KEYS)}")
    if max_runs is not None and not (_is_int(max_runs) and max_runs >= 1):
        raise ValueError("field 'max_runs' must be a positive integer or None")
    skipped: Counter[str] = Counter()
    records: list[dict] = []
    claims: list[float] = []
    for item in evidence:
        audit = item.get("audit") if isinstance(item, Mapping) and "outcomes" not in item and isinstance(item.get("audit"), Mapping) else item
        if not (isinstance(audit, Mapping) and isinstance(audit.get("outcomes"), Mapping)
                and "mechanism" in audit and _is_number(audit.get("claimed_epsilon"))):
            skipped["no_outcomes"] += 1
            continue
        if not same_mechanism(audit["mechanism"], mechanism):
            skipped["other_mechanism"] += 1
            continue
        record = audit["outcomes"].get(kind)
        if record is None:
            skipped["no_record"] += 1
            continue
        if check_outcome(record) is not None or not math.isfinite(audit["claimed_epsilon"]) or audit["claimed_epsilon"] < 0:
            skipped["malformed"] += 1
            continue
        records.append(record)
        claims.append(float(audit["claimed_epsilon"]))
    if sequential:
        confidence = sequential_confidence(max(1, len(records)), confidence)
    if max_runs is not None and len(records) > max_runs:
        skipped["older"] += len(records) - max_runs
        records, claims = records[-max_runs:], claims[-max_runs:]
    result = pool(records, claimed_epsilon=max(claims, default=0.0), delta=float(mechanism["delta"]),
                  confidence=confidence, method=method)
    merged = dict(skipped)
    for reason, n in result.skipped.items():
        merged[reason] = merged.get(reason, 0) + n
    return replace(result, skipped=merged)
