"""The ``dpops`` command line. A thin caller of the library, like the Prefect tasks.

``dpops run`` imports the Prefect flow lazily, so importing :mod:`dpops` never loads Prefect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from dpops.errors import DpopsError
from dpops.settings import apply_quiet_env, workspace

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recurring DP fine-tunes with a privacy-budget ledger.")


def _fail(exc: BaseException, code: int = 2) -> None:
    typer.secho(f"dpops: {exc}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def run(
    job: Path = typer.Argument(..., help="Job config, e.g. configs/jobs/sst2_lora.yaml"),
    policy: Optional[Path] = typer.Option(None, help="Gate policy (default: configs/policy.yaml beside the job's configs)."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the run summary (figures only) to this JSON file."),
) -> None:
    """Run one private fine-tune through every stage (Prefect flow, in-process by default)."""
    apply_quiet_env()
    import logging

    logging.getLogger("dpops").setLevel(logging.INFO)
    ws = workspace()
    ws.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    policy = policy or job.resolve().parent.parent / "policy.yaml"
    from dpops import report

    try:
        from flows.private_finetune import private_finetune

        summary = private_finetune(job_path=str(job.resolve()), policy_path=str(Path(policy).resolve()))
    except DpopsError as exc:
        _fail(exc, 3)
        return
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2))
    typer.echo(report.table(summary, ws.ui_command()))


@app.command()
def budget(
    dataset: Optional[str] = typer.Argument(None, help="One dataset (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Each dataset's cap, spent, remaining and charges, from the ledger."""
    from dpops import report
    from dpops.ledger import Ledger

    ws = workspace()
    if ws.ledger_url.startswith("sqlite:///") and not Path(ws.ledger_url[len("sqlite:///"):]).exists():
        typer.echo("no ledger yet (no run has reserved budget)")
        return
    ledger = Ledger(ws.ledger_url)
    try:
        budgets = [ledger.budget(dataset)] if dataset else ledger.budgets()
    except DpopsError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([{**b.__dict__, "remaining": b.remaining} for b in budgets], indent=2))
    else:
        typer.echo(report.budget_table(budgets))


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="Dataset whose splits to build (a key of params.yaml 'prepare')."),
    params: Path = typer.Option(Path("params.yaml"), help="DVC params file."),
) -> None:
    """Build a dataset's prepared splits (called by `dvc repro`)."""
    from dpops import prepare as prep

    try:
        out = prep.prepare_from_params(params, dataset)
    except DpopsError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(out))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
