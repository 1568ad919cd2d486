"""``dpops ledger``: the privacy ledger's history, verification, operator repairs and schema upgrade."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from dpops.cli.common import fail, open_ledger_or_exit, require_ledger
from dpops.config.workspace import workspace
from dpops.errors import DpopsError

ledger_app = typer.Typer(no_args_is_help=True, help="The privacy ledger: history, verification, releases.")


@ledger_app.command("history")
def ledger_history(
    dataset: str = typer.Argument(..., help="Dataset name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event."),
) -> None:
    """Every event of a dataset's chain, oldest first."""
    ledger = require_ledger()
    try:
        events = list(ledger.history(dataset))
    except DpopsError as exc:
        fail(exc)
        return
    for ev in events:
        if as_json:
            typer.echo(json.dumps(ev))
        else:
            p = ev["payload"]
            detail = ", ".join(f"{k}={v}" for k, v in p.items() if k in (
                "noise_multiplier", "sample_rate", "steps_planned", "steps_run", "job", "reason", "decision",
                "mlflow_run_id", "epsilon_cap", "delta"))
            typer.echo(f"{ev['seq']:>5}  {ev['at']}  {ev['event']:<15} {ev['charge'] or '-':<36}  {detail}")


@ledger_app.command("verify")
def ledger_verify(
    anchors: Optional[Path] = typer.Option(
        None, "--anchors", metavar="PATH",
        help="Also check the chains against this anchor log (default: the workspace's, $DPOPS_ANCHOR_LOG or "
        "$DPOPS_HOME/anchors.jsonl, when it exists)."),
) -> None:
    """Recompute the ledger from its hash chains; exit 1 on any edited, deleted, reordered or forged row.

    Then check every anchor (a chain head signed and kept outside the database, see dpops.ledger.anchors)
    against the chains: a truncated tail or a consistently rewritten chain, which the database's own
    rows cannot show, fails here. Numerical drift of a stored RDP curve (its last digits, e.g. after a
    library upgrade) is printed as a warning and does not fail: no lower figure is adopted, admission
    keeps the stored curve.
    """
    from dpops.ledger.anchors import AnchorLog, verify_anchors

    if anchors is not None and not anchors.is_file():
        fail(f"{anchors}: no such anchor log")
    ledger = open_ledger_or_exit()
    if ledger is None:
        typer.echo("no ledger yet")
        return
    log = AnchorLog(anchors) if anchors is not None else AnchorLog.for_workspace()
    try:
        report = ledger.verify_report()
        anchor_problems = verify_anchors(ledger, log) if log.path.exists() else []
    except DpopsError as exc:
        fail(exc)
        return
    for line in report.drift:
        typer.secho(f"warning: {line}", err=True, fg=typer.colors.YELLOW)
    if report.drift:
        typer.secho("warning: drift is not an edit and does not fail verify; the lower of the two curves is never "
                    "adopted: admission counts the stored curves as written", err=True, fg=typer.colors.YELLOW)
    if report.problems or anchor_problems:
        for p in (*report.problems, *anchor_problems):
            typer.secho(p, err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    checked = f"; {len(log.lines())} anchor(s) in {log.path} match" if log.path.exists() else "; no anchor log"
    if not log.path.exists():
        typer.secho(f"warning: no anchor log at {log.path}: a truncated tail or a consistent rewrite of a chain cannot "
                    "be detected without one (pass --anchors PATH to check a copy)", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"ledger verifies: {len(ledger.datasets())} dataset(s), every chain intact{checked}")


@ledger_app.command("fail")
def ledgerfail(
    charge: str = typer.Argument(..., help="Charge id."),
    reason: str = typer.Option(..., "--reason", help="Why the run is known to be dead."),
) -> None:
    """Close a dead `running` charge as `failed_charged`: it read data, so it stays charged in full."""
    from dpops.errors import LedgerError

    ledger = require_ledger()
    if not reason.strip():
        fail("a failure needs a reason (--reason)")
    try:
        c = ledger.fail(charge, reason=f"closed by an operator: {reason}")
    except (LedgerError, DpopsError) as exc:
        fail(exc)
        return
    typer.echo(f"charge {c.id} is {c.state}: charged in full ({c.mechanism.steps} steps)")


@ledger_app.command("release")
def ledger_release(
    charge: str = typer.Argument(..., help="Charge id."),
    reason: str = typer.Option(..., "--reason", help="Why the reservation is released."),
) -> None:
    """Release a reservation that never read data (refused once the charge is running)."""
    ledger = require_ledger()
    try:
        c = ledger.release(charge, reason=reason)
    except DpopsError as exc:
        fail(exc)
        return
    typer.echo(f"charge {c.id} released ({reason})")


@ledger_app.command("upgrade")
def ledger_upgrade(
    grant: Optional[str] = typer.Option(
        None, "--grant", metavar="ROLE", help="PostgreSQL only: create (if missing) the pipeline role ROLE and grant it "
        "exactly what the ledger writes; it owns no table, so it cannot drop, truncate or alter one, nor its triggers."),
    print_sql: bool = typer.Option(False, "--print-sql", help="With --grant: print the role's SQL for a DBA and change nothing."),
) -> None:
    """Bring the ledger's schema to this version, as the admin role (DPOPS_LEDGER_ADMIN_URL, else DPOPS_LEDGER_URL).

    Opening a ledger never migrates one that exists: a schema behind this code is refused, naming this command
    (take a backup first). Idempotent; prints the revisions it went from and to.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    from dpops.errors import LedgerError, LedgerUnavailableError
    from dpops.ledger import roles as ledger_roles
    from dpops.ledger import schema as ledger_schema
    from dpops.ledger import store as ledger_store

    ws = workspace()
    url = os.environ.get("DPOPS_LEDGER_ADMIN_URL") or ws.ledger_url
    if url.startswith("sqlite:///"):
        if grant:
            fail("--grant: a pipeline role exists only on PostgreSQL (SQLite has no roles)")
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if print_sql and not grant:
        fail("--print-sql prints the SQL of --grant ROLE: name the role")
    engine = ledger_store.Ledger(url, create=False).engine
    try:
        if print_sql:
            for statement in ledger_roles.pipeline_role_sql(engine, grant):
                typer.echo(statement + ";")
            return
        before, after = ledger_schema.migrate_schema(engine)  # refuses, naming the admin URL, a role that may not migrate
        if before != after:
            typer.echo(f"ledger schema upgraded from revision {before or 'none'} to {after}")
        else:
            typer.echo(f"ledger schema already at revision {after}")
        if grant:
            ledger_roles.grant_pipeline_role(engine, grant)
            typer.echo(f"role {grant!r}: reads the ledger and appends to it, updates only the chain head and the spend "
                       "index, owns nothing")
    except OperationalError as exc:  # the URL may hold a password: name the error class only
        fail(LedgerUnavailableError(f"the ledger's database could not be reached ({type(exc.orig).__name__})"))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        fail(LedgerError(f"role {engine.url.username!r} may not grant roles on the ledger: run `dpops ledger upgrade` "
                          "as the admin role (DPOPS_LEDGER_ADMIN_URL)"))
    except DpopsError as exc:
        fail(exc)
    finally:
        engine.dispose()


#: The command's old name, kept (hidden) so that existing scripts keep working.
ledger_app.command("migrate", hidden=True)(ledger_upgrade)
