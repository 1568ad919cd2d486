"""Human-readable summaries of a run and of the budgets. Figures only, never records."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterable, Optional

from dpops.ledger.states import DatasetBudget


def _rows(summary: dict[str, Any], ui_command: str = "") -> list[tuple[str, str]]:
    rows = [
        ("dataset", f"{summary['dataset']} ({summary['data_version'][:24]}...)"),
        ("epsilon this run", f"{summary['epsilon_run']:.3f} at delta {summary['delta']:g} (RDP accountant; sigma {summary['noise_multiplier']:.3f}, q {summary['sample_rate']:.2e}, {summary['steps']} steps)"),
        ("cumulative epsilon / cap", f"{summary['cumulative_epsilon']:.3f} / {summary['epsilon_cap']:g} (adaptive-composition guarantee from the ledger"
                                     + ("; the dataset's most spent block)" if summary.get("blocks") else ")")),
    ]
    if summary.get("blocks"):
        rows.append(("blocks read", "; ".join(f"{b['name']} ({b['n']} units; cumulative {b['spent']:.3f} / {b['epsilon_cap']:g})"
                                              for b in summary["blocks"])))
    rows += [
        _utility_row(summary),
        ("audit", f"{summary['audit_verdict']} (decided by the {summary.get('audit_decided_by', 'black-box canaries')}; "
                  f"could refute at most {summary.get('audit_ceiling', summary['canary_ceiling']):.2f} at this q and steps)"),
        ("audit bounds (95% together)", _bounds(summary)),
    ]
    if summary.get("audit_pooled"):
        rows.append(("audit across runs", _pooled(summary["audit_pooled"])))
    rows += [
        ("gate", summary["decision"] + (f" -> alias '{summary['alias']}'" if summary["decision"] == "PROMOTED" else f": {'; '.join(summary['reasons'])}")),
        *([("gate read", "; ".join(summary["gate_evidence"]))] if summary.get("gate_evidence") else []),
        ("model", f"{summary['model']} (MLflow run {summary['mlflow_run_id']})"),
    ]
    if ui_command:
        rows.append(("open the MLflow UI", ui_command))
    return rows


def _bounds(summary: dict[str, Any]) -> str:
    """The one-run epsilon lower bounds of the run's audits and the noise check (canaries only)."""
    parts = []
    if summary.get("white_box_ceiling"):
        parts.append(f"white-box {summary['white_box_epsilon_lower_bound']:.3f} of at most {summary['white_box_ceiling']:.2f}")
        if summary.get("noise_multiplier_upper") is not None:
            parts.append(f"noise seen <= {summary['noise_multiplier_upper']:.3f} C (claimed sigma {summary['noise_multiplier']:.3f})")
    parts.append(f"black-box {summary['canary_epsilon_lower_bound']:.3f} of at most {summary['canary_ceiling']:.2f}")
    parts.append(f"canary MIA AUC {_auc(summary['mia_auc'])} (heuristic, not gating)")
    return "; ".join(parts)


def _pooled(pooled: dict[str, Any]) -> str:
    """The dataset's pooled evidence (reported, never deciding), as the gate states it."""
    from dpops.registry.gate import pooled_line

    return "; ".join(pooled_line(pooled))


def _auc(value: Optional[float]) -> str:
    """The canary membership-inference AUC (None: every canary fell on one side)."""
    return "n/a" if value is None else f"{value:.3f}"


#: Said beside every eval figure: exact statistics of the eval split, which the run's epsilon does not cover.
EVAL_NOT_COVERED = "exact on the eval split, not covered by epsilon"


def _utility_row(summary: dict[str, Any]) -> tuple[str, str]:
    """Accuracy for a classifier; eval loss and perplexity for a language model (which has no accuracy)."""
    if summary.get("accuracy") is None:
        return ("eval loss", f"{summary['eval_loss']:.4f} (perplexity {summary['perplexity']:.2f}; {EVAL_NOT_COVERED})")
    return ("accuracy (eval)", f"{summary['accuracy']:.4f} (majority class {summary['majority_baseline']:.4f}; {EVAL_NOT_COVERED})")


def table(summary: dict[str, Any], ui_command: str = "") -> str:
    rows = _rows(summary, ui_command)
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


def markdown(summary: dict[str, Any]) -> str:
    body = "\n".join(f"| {k} | {v} |" for k, v in _rows(summary))
    return "# dpops private fine-tune\n\n| | |\n| --- | --- |\n" + body + "\n"


def budget_dict(b: DatasetBudget) -> dict[str, Any]:
    d = asdict(b)
    d["remaining"] = b.remaining
    d["blocks"] = [{**asdict(x), "remaining": x.remaining} for x in b.blocks]
    d["filter"] = b.privacy_filter.describe()
    return d


def _runs_left(n: Optional[int]) -> str:
    return "-" if n is None else str(n)


def budget_table(budgets: Iterable[DatasetBudget]) -> str:
    header = ("dataset", "unit", "delta", "cap", "spent", "remaining", "runs left", "pld estimate", "charges")
    rows, filters = [], []
    for b in budgets:
        rows.append((b.name, b.unit, f"{b.delta:g}", f"{b.epsilon_cap:g}", f"{b.spent:.3f}", f"{b.remaining:.3f}",
                     _runs_left(b.runs_left), "-" if b.pld_estimate is None else f"{b.pld_estimate:.3f}",
                     ", ".join(f"{k} {v}" for k, v in sorted(b.charges.items())) or "none"))
        for x in b.blocks:
            unit = "users" if b.unit == "user" else "records"
            rows.append((f"  block {x.name}", "", "", f"{x.epsilon_cap:g}", f"{x.spent:.3f}", f"{x.remaining:.3f}",
                         _runs_left(x.runs_left), "", f"{x.n_records} {unit}"))
        last = b.last_mechanism
        filters.append(f"{b.name}: {b.privacy_filter.describe()}"
                       + (f"; runs left: of the last charge's mechanism (sigma {last.noise_multiplier:.4g}, q {last.sample_rate:.3g}, "
                          f"{last.steps} steps)" if last else ""))
    if not rows:
        return "no datasets registered in the ledger"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    legend = ("spent: guaranteed epsilon under adaptive composition (RDP filter), what admission uses; "
              "pld estimate: tighter figure for the same charges as a fixed sequence, reported only")
    return "\n".join([fmt.format(*header), *(fmt.format(*r) for r in rows), "", "filters (fixed at registration):",
                      *(f"  {line}" for line in filters), "", legend])
