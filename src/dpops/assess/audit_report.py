"""The audit's report: JSON, markdown and a plot, with figures only.

Every figure comes from the canaries, scored by the DP model: canaries are synthetic and their
scores are post-processing of the DP output, so per-canary scores and inclusion flags are written
in full. No real record is scored, so no statistic of one (not even a histogram) appears.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dpops.assess.audit import AuditResult

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "audit.json", "audit.md", "audit.png"
_BINS = 30


def _histogram(a: Sequence[float], b: Sequence[float]) -> dict[str, list[float]]:
    """Counts of two score samples on shared bin edges."""
    both = np.concatenate([np.asarray(a, dtype=float), np.asarray(b, dtype=float)])
    edges = np.histogram_bin_edges(both, bins=_BINS)
    return {"edges": edges.tolist(), "first": np.histogram(a, edges)[0].tolist(), "second": np.histogram(b, edges)[0].tolist()}


def _figure(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(audit: Mapping[str, Any]) -> str:
    """A markdown summary of an audit's figures (the dict of :meth:`AuditResult.to_dict`)."""
    rows = [
        ("verdict", f"{audit['verdict']} (decided by the {audit.get('decided_by', 'black-box canaries')})"),
        ("claimed epsilon", f"{audit['claimed_epsilon']:.3f} at delta {audit['delta']:g} (the ledger charge, at the steps run)"),
        ("most the audit could refute", f"{audit.get('ceiling', audit['canary_ceiling']):.3f} (what a run that memorised every "
                                        "canary it sampled would reach, at this q and number of steps)"),
    ]
    if audit.get("white_box_canaries"):
        rows += [
            ("white-box canaries: epsilon lower bound", f"{audit['white_box_epsilon_lower_bound']:.3f} of at most "
                                                        f"{audit['white_box_ceiling']:.3f} ({audit['white_box_correct']} of "
                                                        f"{audit['white_box_guesses']} 'in' guesses right; "
                                                        f"{audit['white_box_included']} of {audit['white_box_canaries']} included)"),
            ("white-box noise check", f"noise in the released sums at most {_figure(audit['noise_multiplier_upper'])} C "
                                      f"(upper bound; claimed sigma {audit['mechanism'].get('noise_multiplier', 0.0):.3f}; "
                                      f"p = {_pvalue(audit['noise_p_value'])})"),
        ]
    rows += [
        ("black-box canaries: epsilon lower bound", f"{audit['canary_epsilon_lower_bound']:.3f} of at most "
                                                    f"{audit['canary_ceiling']:.3f} at this q "
                                                    f"({_figure(audit.get('canary_all_detected_ceiling'))} if every "
                                                    "included canary were sampled)"),
        ("black-box canaries: guesses", f"{audit['canary_correct']} of {audit['canary_guesses']} right "
                                        f"({audit['canary_guesses_in']} 'in', the rest 'out'; "
                                        f"{audit['canaries_included']} of {audit['canaries']} canaries trained on; "
                                        f"scores: {audit.get('canary_scoring', '-loss')})"),
        ("membership inference on the canaries (heuristic, not gating): AUC", f"{_figure(audit['mia_auc'])}"),
        ("... TPR at 1% / 0.1% FPR",
         f"{_figure(audit['mia_tpr_at_1pct_fpr'])} / {_figure(audit['mia_tpr_at_01pct_fpr'])}"),
        ("... epsilon lower bound treating one model's canaries as independent", f"{audit['mia_epsilon_lower_bound']:.3f}"),
        ("accountant cross-check", f"{'OK' if audit['cross_check_ok'] else 'MISMATCH'} (dpops {audit['accountant_epsilon']:.6f} "
                                   f"for the charge, dp_accounting {audit['cross_check_epsilon']:.6f} for what the trainer "
                                   f"ran: sigma {audit.get('trained_noise_multiplier', float('nan')):.4f}, "
                                   f"q {audit.get('trained_sample_rate', float('nan')):.3g}, {audit.get('trained_steps', '?')} steps)"),
    ]
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    reasons = "".join(f"\n- {r}" for r in audit["reasons"]) or "\n- none"
    return (f"# dpops privacy audit: {audit['verdict']}\n\n| | |\n| --- | --- |\n{body}\n\n## Reasons{reasons}\n\n"
            "A lower bound above the claimed epsilon, or less noise than claimed, means the DP implementation or its "
            "accounting is broken. A PASS is evidence against gross bugs, not proof of the claim. Every figure comes "
            "from synthetic canaries (input canaries scored by the model, gradient canaries read from the released "
            "noisy sums); no real record is scored.\n")


def _pvalue(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _plot(result: AuditResult, canary_hist: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    edges = np.asarray(canary_hist["edges"])
    axes[0].stairs(canary_hist["first"], edges, label="trained on", fill=True, alpha=0.5)
    axes[0].stairs(canary_hist["second"], edges, label="not trained on", fill=True, alpha=0.5)
    axes[0].set_title("input canaries: calibrated score")
    axes[0].set_xlabel("score")
    axes[0].set_ylabel("count")
    axes[0].legend()
    names = ["claimed", "white-box\nlower bound", "black-box\nlower bound", "most\nrefutable"]
    values = [result.claimed_epsilon, result.white_box_epsilon_lower_bound, result.canary_epsilon_lower_bound, result.ceiling]
    axes[1].bar(names, values, color=["tab:blue", "tab:red", "tab:orange", "tab:gray"])
    axes[1].axhline(result.claimed_epsilon, color="tab:blue", linestyle="--")
    axes[1].set_title(f"epsilon: verdict {result.verdict}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write(result: AuditResult, out_dir: Path, *, canary_scores: Sequence[float], canary_included: Sequence[bool],
          white_box_scores: Optional[Sequence[float]] = None, white_box_included: Optional[Sequence[bool]] = None) -> dict[str, Path]:
    """Write ``audit.json``, ``audit.md`` and ``audit.png`` into ``out_dir``; return their paths.

    ``audit.json`` holds every canary's score and inclusion flag (input canaries, and gradient
    canaries when the run had them), so that anyone can recompute the bounds from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    inc = np.asarray(canary_included, dtype=bool)
    scores = np.asarray(canary_scores, dtype=float)
    canary_hist = _histogram(scores[inc], scores[~inc])
    data = {**result.to_dict(), "canary_scores": scores.tolist(), "canary_included": inc.tolist(), "canary_histogram": canary_hist}
    if white_box_scores is not None and white_box_included is not None:
        data.update(white_box_scores=np.asarray(white_box_scores, dtype=float).tolist(),
                    white_box_included=np.asarray(white_box_included, dtype=bool).tolist())
    paths = {"json": out_dir / JSON_FILE, "markdown": out_dir / MARKDOWN_FILE, "plot": out_dir / PLOT_FILE}
    paths["json"].write_text(json.dumps(data, indent=2))
    paths["markdown"].write_text(markdown(result.to_dict()))
    _plot(result, canary_hist, paths["plot"])
    return paths
