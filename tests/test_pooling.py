"""Pooled audit evidence (dpops.assess.pooling) and the ledger read that feeds it (Ledger.evidence_of).

The outcome records are simulated the way the audit stage writes them (issue 17): synthetic
canaries, each included with probability 1/2, scored with a separation ``shift`` between included
and excluded ones; the cells are the one-run audit's pre-registered (r, split) guesses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from dpops.assess import bounds
from dpops.assess.pooling import bayes_interval, dataset_pool, pool, same_mechanism
from dpops.errors import LedgerError
from dpops.ledger.store import Ledger
from dpops.privacy.accounting import SubsampledGaussian

MECH = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "delta": 1e-6}


def _record(rng: np.random.Generator, m: int, shift: float) -> dict:
    """One run's outcome record: cells as :func:`dpops.assess.audit.canary_audit` guesses, confusion at the
    median (top half "in")."""
    inc = rng.random(m) < 0.5
    scores = rng.normal(size=m) + shift * inc
    order = np.argsort(-scores, kind="mergesort")
    cells = []
    for r in bounds._guess_counts(m):
        for split in bounds.SPLITS:
            k_in = int(round(r * split))
            guessed_in, guessed_out = order[:k_in], order[m - (r - k_in):]
            cells.append([r, int(inc[guessed_in].sum() + (~inc[guessed_out]).sum())])
    g = np.zeros(m, dtype=bool)
    g[order[: m // 2]] = True
    confusion = {"TP": int((g & inc).sum()), "FP": int((g & ~inc).sum()), "TN": int((~g & ~inc).sum()), "FN": int((~g & inc).sum())}
    return {"canaries": m, "cells": cells, "confusion": confusion}


def _evidence(record, *, mechanism=MECH, claimed=1.0, kind="white_box") -> dict:
    """An evidence audit dict as the audit stage writes it."""
    return {"verdict": "PASS", "claimed_epsilon": claimed, "mechanism": dict(mechanism),
            "outcomes": {"white_box": record if kind == "white_box" else None, "black_box": record}}


def test_the_pooled_bound_is_the_one_run_bound_on_the_summed_counts():
    """K runs' canaries are one run of M = sum m canaries to the theorem: cell by cell, r and v add up,
    and the correction is over the cells (not the runs)."""
    rng = np.random.default_rng(7)
    records = [_record(rng, 1000, 1.0) for _ in range(3)]
    got = pool(records, claimed_epsilon=1.0, delta=1e-6)
    n_cells = len(records[0]["cells"])
    level = 1 - 0.05 / n_cells
    summed = [(sum(rec["cells"][c][0] for rec in records), sum(rec["cells"][c][1] for rec in records)) for c in range(n_cells)]
    expected = max(bounds.one_run_epsilon_lower_bound(m=3000, r=r, v=v, delta=1e-6, confidence=level) for r, v in summed)
    assert got.runs == 3 and got.canaries == 3000 and list(got.cells) == summed
    assert got.epsilon_lower_bound == pytest.approx(expected, rel=1e-12) and expected > 0
    assert got.confusion == {k: sum(rec["confusion"][k] for rec in records) for k in ("TP", "FP", "TN", "FN")}
    # one run pooled alone is exactly that run's one-run audit (same grid, same correction)
    single = pool(records[:1], claimed_epsilon=1.0, delta=1e-6)
    assert single.ceiling == pytest.approx(bounds.one_run_ceiling(1000, delta=1e-6), rel=1e-12)


def test_pooling_five_runs_refutes_a_claim_no_single_run_can():
    """A run that leaks more than it claims, repeated: each run's 1000 canaries stay under the claim,
    the five runs' 5000 canaries exceed it (and raise the ceiling)."""
    record = _record(np.random.default_rng(1), 1000, 1.0)
    one = pool([record], claimed_epsilon=2.0, delta=1e-6)
    five = pool([record] * 5, claimed_epsilon=2.0, delta=1e-6)
    assert 0 < one.epsilon_lower_bound < 2.0 < five.epsilon_lower_bound
    assert not one.exceeds_claim and five.exceeds_claim
    assert five.ceiling > one.ceiling and five.canaries == 5000
    # and more than the best of five different single runs, too
    rng = np.random.default_rng(2)
    records = [_record(rng, 1000, 1.0) for _ in range(5)]
    best_single = max(pool([r], claimed_epsilon=2.0, delta=1e-6).epsilon_lower_bound for r in records)
    assert pool(records, claimed_epsilon=2.0, delta=1e-6).epsilon_lower_bound > best_single


def test_same_mechanism_tolerates_round_off_only():
    assert same_mechanism(MECH, {**MECH, "noise_multiplier": 1.0 * (1 + 1e-12)})
    assert not same_mechanism(MECH, {**MECH, "noise_multiplier": 1.0 * (1 + 1e-6)})
    assert not same_mechanism(MECH, {**MECH, "steps": 101})
    assert not same_mechanism(MECH, {**MECH, "steps": 100.0})  # steps are counted, not measured
    assert not same_mechanism(MECH, {k: v for k, v in MECH.items() if k != "delta"})
    assert not same_mechanism(MECH, {**MECH, "sampler": "poisson"})  # a field one side lacks separates them
    assert not same_mechanism({}, {})


def test_runs_of_another_mechanism_are_not_pooled():
    rng = np.random.default_rng(3)
    mine = [_record(rng, 1000, 1.0) for _ in range(3)]
    other = [_record(rng, 1000, 3.0) for _ in range(2)]  # a leakier mechanism: it would raise the bound
    evidence = [_evidence(mine[0]), _evidence(other[0], mechanism={**MECH, "noise_multiplier": 0.5}),
                _evidence(mine[1]), _evidence(other[1], mechanism={**MECH, "steps": 200}), _evidence(mine[2])]
    got = dataset_pool(evidence, mechanism=MECH)
    assert got.runs == 3 and got.skipped == {"other_mechanism": 2} and got.runs_skipped == 2
    assert got.epsilon_lower_bound == pool(mine, claimed_epsilon=1.0, delta=MECH["delta"]).epsilon_lower_bound


def test_old_evidence_and_runs_without_a_record_are_skipped_and_counted():
    rng = np.random.default_rng(4)
    records = [_record(rng, 1000, 1.0) for _ in range(2)]
    old = {"verdict": "PASS", "reasons": [], "claimed_epsilon": 1.0, "canary_epsilon_lower_bound": 0.1}
    evidence = [old, _evidence(records[0]), _evidence(records[1], kind="black_box"), {"task": "x", "audit": old}]
    got = dataset_pool(evidence, mechanism=MECH)
    assert got.runs == 1 and got.skipped == {"no_outcomes": 2, "no_record": 1}
    assert dataset_pool(evidence, mechanism=MECH, kind="black_box").runs == 2
    nothing = dataset_pool([old], mechanism=MECH)
    assert nothing.runs == 0 and nothing.epsilon_lower_bound == 0.0 and nothing.bayes_epsilon_lo is None
    assert nothing.to_dict()["runs_skipped"] == 1


def test_a_run_with_other_guess_counts_is_skipped_not_misaligned():
    """Cells are pooled by index: a run of 2000 canaries has other r's, so it is left out, and a
    malformed record is skipped by dataset_pool but refused by pool, naming the field."""
    rng = np.random.default_rng(5)
    records = [_record(rng, 1000, 1.0), _record(rng, 2000, 1.0), _record(rng, 1000, 1.0)]
    got = pool(records, claimed_epsilon=1.0, delta=1e-6)
    assert got.runs == 2 and got.canaries == 2000 and got.skipped == {"cells_differ": 1}
    bad = {**records[0], "cells": [[10, 11]]}
    with pytest.raises(ValueError, match="outcome record 1: field 'cells'"):
        pool([records[0], bad], claimed_epsilon=1.0, delta=1e-6)
    assert dataset_pool([_evidence(records[0]), _evidence(bad)], mechanism=MECH).skipped == {"malformed": 1}


def test_max_runs_pools_the_most_recent_runs():
    rng = np.random.default_rng(6)
    records = [_record(rng, 1000, 1.0) for _ in range(4)]
    got = dataset_pool([_evidence(r) for r in records], mechanism=MECH, max_runs=2)
    assert got.runs == 2 and got.skipped == {"older": 2}
    assert got.cells == pool(records[2:], claimed_epsilon=1.0, delta=1e-6).cells


def test_bayesian_interval_separates_a_leaky_attack_from_chance():
    strong = bayes_interval({"TP": 600, "FP": 30, "TN": 4400, "FN": 1900}, delta=1e-5)
    chance = bayes_interval({"TP": 1250, "FP": 1250, "TN": 1250, "FN": 1250}, delta=1e-5)
    assert 0 < strong[0] <= strong[1] < math.inf and strong[2] is None
    assert chance[0] == 0.0 and chance[1] < 0.2


def test_bayesian_interval_uses_the_counts_the_right_way_round():
    """An independent computation of the Jeffreys interval's lower end (FPR and FNR, each at
    alpha/4 one-sided): a swapped field (FP for FN, say) gives another number."""
    c = {"TP": 600, "FP": 30, "TN": 4400, "FN": 1900}
    delta, alpha = 1e-5, 0.05
    fpr_hi = beta.ppf(1 - alpha / 4, c["FP"] + 0.5, c["TN"] + 0.5)
    fnr_hi = beta.ppf(1 - alpha / 4, c["FN"] + 0.5, c["TP"] + 0.5)
    expected_lo = math.log((1 - delta - max(fpr_hi, fnr_hi)) / min(fpr_hi, fnr_hi))
    assert bayes_interval(c, delta=delta, confidence=1 - alpha)[0] == pytest.approx(expected_lo, rel=1e-9)
    swapped = bayes_interval({**c, "FP": c["FN"], "FN": c["FP"], "TP": c["TN"], "TN": c["TP"]}, delta=delta)[0]
    assert swapped == pytest.approx(expected_lo, rel=1e-9)  # relabelling in/out is a symmetry of DP
    assert bayes_interval({**c, "FP": c["FN"], "FN": c["FP"]}, delta=delta)[0] != pytest.approx(expected_lo, rel=1e-3)


def test_bayesian_interval_covers_a_known_epsilon():
    """Counts of an attack on the boundary of pure eps=2 DP (FPR = FNR = 1 / (1 + e^2)), 5000 members
    and 5000 non-members: the 95% interval contains 2."""
    rng = np.random.default_rng(11)
    rate = 1 / (1 + math.exp(2.0))
    fn, fp = int(rng.binomial(5000, rate)), int(rng.binomial(5000, rate))
    lo, hi, _ = bayes_interval({"TP": 5000 - fn, "FN": fn, "FP": fp, "TN": 5000 - fp}, delta=0.0)
    assert lo < 2.0 < hi and hi - lo < 0.5


def test_bayesian_interval_matches_the_privacy_estimates_readme_example():
    """The README's CIFAR10 example (TP 487, TN 1, FP 512, FN 0; alpha 0.1, delta 1e-5): Jeffreys
    gives [0, inf). (Its joint-beta row, 0.145 to 6.399, takes minutes: not run here.)"""
    lo, hi, _ = bayes_interval({"TP": 487, "TN": 1, "FP": 512, "FN": 0}, delta=1e-5, confidence=0.9)
    assert lo == 0.0 and hi == math.inf
    pooled = pool([{"canaries": 1000, "cells": [[2, 1]], "confusion": {"TP": 487, "TN": 1, "FP": 512, "FN": 0}}],
                  claimed_epsilon=10.0, delta=1e-5, confidence=0.9)
    assert pooled.bayes_epsilon_hi == math.inf and pooled.to_dict()["bayes_epsilon_hi"] is None


def test_no_interval_without_members_or_non_members():
    lo, hi, note = bayes_interval({"TP": 0, "FP": 10, "TN": 10, "FN": 0}, delta=1e-5)
    assert lo is None and hi is None and "no included" in note


# --------------------------------------------------------------------------- the ledger read


@pytest.fixture
def ledger(make_ledger):
    """An empty SQLite ledger: each test registers its datasets (overrides the shared ``ledger``)."""
    return make_ledger()


def _charge_with_evidence(ledger: Ledger, dataset: str, version: int, audit_dict, *, evidence=True) -> str:
    ledger.register_dataset(name=dataset, unit="record", delta=1e-6, epsilon_cap=50.0)
    c = ledger.reserve(dataset=dataset, mechanism=SubsampledGaussian(1.0, 0.01, 100), max_grad_norm=1.0,
                       n_records=50_000, job="j", data_version=f"sha256:{dataset}")
    ledger.start(c.id)
    ledger.commit(c.id, steps_run=100)
    ledger.bind_model(c.id, model_name="m", model_version=str(version), mlflow_run_id="run-" + c.id[:8], artifact_sha256="ab" * 32)
    if evidence:
        ledger.record_evidence(c.id, task="classification", figures={"accuracy": 0.9}, audit=audit_dict)
    return c.id


def test_evidence_of_returns_a_datasets_evidence_in_chain_order(ledger):
    rng = np.random.default_rng(8)
    records = [_record(rng, 1000, 1.0) for _ in range(3)]
    old = {"verdict": "PASS", "claimed_epsilon": 1.0}
    ids = [_charge_with_evidence(ledger, "notes", 1, old),
           _charge_with_evidence(ledger, "other", 2, _evidence(records[0]))]
    ids.append(_charge_with_evidence(ledger, "notes", 3, _evidence(records[1])))
    _charge_with_evidence(ledger, "notes", 4, None, evidence=False)  # bound, no evidence yet
    ids.append(_charge_with_evidence(ledger, "notes", 5, _evidence(records[2])))
    got = ledger.evidence_of("notes")
    assert [cid for cid, _ in got] == [ids[0], ids[2], ids[3]]
    assert [p["audit"] for _, p in got] == [old, _evidence(records[1]), _evidence(records[2])]
    assert all(p["task"] == "classification" and p["accuracy"] == 0.9 for _, p in got)
    assert [cid for cid, _ in ledger.evidence_of("other")] == [ids[1]]
    pooled = dataset_pool([p for _, p in got], mechanism=MECH)  # payloads are read through "audit"
    assert pooled.runs == 2 and pooled.skipped == {"no_outcomes": 1}
    assert pooled.cells == pool(records[1:], claimed_epsilon=1.0, delta=1e-6).cells
    with pytest.raises(LedgerError, match="not registered"):
        ledger.evidence_of("nope")


def test_pooling_loads_neither_torch_nor_prefect():
    """The gate pools on the ledger host, which has neither (see tests/test_boundaries.py)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dpops.assess.pooling import pool\n"
            "pool([{'canaries': 10, 'cells': [[2, 2]], 'confusion': {'TP': 4, 'FP': 1, 'TN': 4, 'FN': 1}}],"
            " claimed_epsilon=1.0, delta=1e-5)\n"
            "print('torch' in sys.modules, 'prefect' in sys.modules, 'privacy_estimates' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


def test_sequential_looks_spend_at_most_the_total_alpha():
    """Re-pooling after every run is a test per run: the per-look alphas must add up to at most 5%."""
    from dpops.assess.pooling import sequential_confidence

    alphas = [1 - sequential_confidence(k, 0.95) for k in range(1, 100_001)]
    assert sum(alphas) <= 0.05 and sum(alphas) > 0.0499
    assert all(a > b for a, b in zip(alphas[:1000], alphas[1:1000], strict=False))  # beyond, 1 - (1 - a) rounds
    with pytest.raises(ValueError, match="field 'look'"):
        sequential_confidence(0)
