"""The ``dpops`` command line. A thin caller of the library, like the Prefect tasks.

One module per concern: :mod:`.ledger` (``dpops ledger ...``), :mod:`.dataset` (``dpops dataset ...``,
``dpops prepare``), :mod:`.models` (``promote``, ``predict``, ``serve``); ``run`` and ``budget`` are here.
Exit codes: :func:`dpops.errors.exit_code` (README, "Exit codes").

``dpops run`` imports the Prefect flow lazily, so importing :mod:`dpops` never loads Prefect.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from dpops.cli import models
from dpops.cli.common import fail, open_ledger_or_exit
from dpops.cli.dataset import dataset_app, prepare
from dpops.cli.ledger import ledger_app
from dpops.config.workspace import apply_quiet_env, workspace
from dpops.errors import DpopsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recurring DP fine-tunes with a privacy-budget ledger.")


@app.command()
def run(
    job: Path = typer.Argument(..., help="Job config, e.g. configs/jobs/sst2_lora.yaml"),
    policy: Optional[Path] = typer.Option(
        None, help="Gate policy (default: configs/policy.yaml beside the job's configs); plan reads it too, to refuse "
        "a claim the audit cannot test before anything is charged."),
    summary_json: Optional[Path] = typer.Option(None, help="Also write the run summary (figures only) to this JSON file."),
    debug: bool = typer.Option(False, "--debug", help="Keep Prefect's tracebacks of a dpops error (also: DPOPS_DEBUG=1)."),
) -> None:
    """Run one private fine-tune through every stage (Prefect flow, in-process by default).

    The preflight (:func:`dpops.pipeline.stages.preflight`) runs first, before Prefect starts: a mistake in a
    config, the model directory or a hold-out/eval file exits 2 within seconds, nothing reserved.
    """
    apply_quiet_env()
    import logging

    logging.getLogger("dpops").setLevel(logging.INFO)
    ws = workspace()
    policy = policy or job.resolve().parent.parent / "policy.yaml"
    from dpops.pipeline import report, stages

    try:
        stages.preflight(str(job.resolve()), policy_path=str(Path(policy).resolve()))
    except DpopsError as exc:
        fail(exc)
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    if not (debug or os.environ.get("DPOPS_DEBUG")):
        _quiet_dpops_tracebacks()
    try:
        from flows.private_finetune import private_finetune

        summary = private_finetune(job_path=str(job.resolve()), policy_path=str(Path(policy).resolve()))
    except DpopsError as exc:
        fail(exc)
        return
    if summary_json:
        summary_json.write_text(json.dumps(summary, indent=2))
    typer.echo(report.table(summary, ws.ui_command()))


class _NoDpopsTraceback:
    """A logging filter keeping a record's message but dropping its traceback when the exception is
    a dpops error: its message already names the file and field, and ``dpops run`` prints it."""

    def filter(self, record) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DpopsError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_dpops_tracebacks() -> None:
    """Prefect's task and flow engines log a failed run's exception at ERROR with its traceback."""
    import logging

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.engine", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoDpopsTraceback) for f in logger.filters):
            logger.addFilter(_NoDpopsTraceback())


@app.command()
def budget(
    dataset: Optional[str] = typer.Argument(None, help="One dataset (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Each dataset's cap, spent, remaining and charges, from the ledger."""
    from dpops.pipeline import report

    ledger = open_ledger_or_exit()
    if ledger is None:
        typer.echo("no ledger yet (no run has reserved budget)")
        return
    try:
        budgets = [ledger.budget(dataset, estimate=True)] if dataset else ledger.budgets(estimate=True)
    except DpopsError as exc:
        fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([report.budget_dict(b) for b in budgets], indent=2))
    else:
        typer.echo(report.budget_table(budgets))


# The commands of the other modules, in the order `dpops --help` lists them.
app.add_typer(dataset_app, name="dataset")
app.add_typer(ledger_app, name="ledger")
app.command()(prepare)
app.command()(models.promote)
app.command()(models.predict)
app.command()(models.serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
