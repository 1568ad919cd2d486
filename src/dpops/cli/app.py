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

from dpops.config.workspace import apply_quiet_env, workspace
from dpops.errors import EXIT_BAD_INPUT, DpopsError, exit_code

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Recurring DP fine-tunes with a privacy-budget ledger.")


def _fail(exc: BaseException | str, code: Optional[int] = None) -> None:
    """Print ``exc`` and exit: with ``code``, else the documented code of the error (:func:`dpops.errors.exit_code`),
    2 (bad input) for a plain message."""
    typer.secho(f"dpops: {exc}", err=True, fg=typer.colors.RED)
    if code is None:
        code = exit_code(exc) if isinstance(exc, BaseException) else EXIT_BAD_INPUT
    raise typer.Exit(code)


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
        _fail(exc)
        return
    ws.root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(ws.prefect_home))
    if not (debug or os.environ.get("DPOPS_DEBUG")):
        _quiet_dpops_tracebacks()
    try:
        from flows.private_finetune import private_finetune

        summary = private_finetune(job_path=str(job.resolve()), policy_path=str(Path(policy).resolve()))
    except DpopsError as exc:
        _fail(exc)
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


dataset_app = typer.Typer(no_args_is_help=True, help="Datasets in the ledger.")
ledger_app = typer.Typer(no_args_is_help=True, help="The privacy ledger: history, verification, releases.")
app.add_typer(dataset_app, name="dataset")
app.add_typer(ledger_app, name="ledger")


def _open_ledger(must_exist: bool = True):
    from dpops.ledger.workspace import open_ledger

    try:
        return open_ledger(must_exist=must_exist)
    except DpopsError as exc:  # locked past DPOPS_LEDGER_LOCK_TIMEOUT, unreachable, or a bad setting
        _fail(exc)


def _require_ledger():
    ledger = _open_ledger()
    if ledger is None:
        _fail("no ledger yet (no run has reserved budget)")
    return ledger


@dataset_app.command("register")
def dataset_register(
    config: Path = typer.Argument(..., help="Dataset config, e.g. configs/datasets/sst2.yaml"),
) -> None:
    """Register a dataset's unit, delta, cap and privacy filter in the ledger (no-op if registered with
    the same terms). The filter is the config's ``privacy.filter_orders``, else the grid
    (:data:`dpops.privacy.filters.GRID_FILTER`): a job's first run chooses a sharper one from its mechanism."""
    from dpops.config.loading import load_dataset_config
    from dpops.privacy import filters

    try:
        cfg = load_dataset_config(config)
        ledger = _open_ledger(must_exist=False)
        ledger.register_dataset(name=cfg.ledger_name, unit=cfg.unit, delta=cfg.privacy.delta, epsilon_cap=cfg.privacy.epsilon_cap,
                                contribution_bound=cfg.contribution_bound, source=cfg.source,
                                linked_from=cfg.name if cfg.budget_of else None,
                                privacy_filter=cfg.privacy.privacy_filter or filters.GRID_FILTER,
                                filter_from_config=cfg.privacy.filter_orders is not None)
    except DpopsError as exc:
        _fail(exc)
        return
    typer.echo(f"dataset {cfg.name!r}: unit {cfg.unit}, delta {cfg.privacy.delta:g}, cap {cfg.privacy.epsilon_cap:g}")


@ledger_app.command("history")
def ledger_history(
    dataset: str = typer.Argument(..., help="Dataset name."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event."),
) -> None:
    """Every event of a dataset's chain, oldest first."""
    ledger = _require_ledger()
    try:
        events = list(ledger.history(dataset))
    except DpopsError as exc:
        _fail(exc)
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
        _fail(f"{anchors}: no such anchor log")
    ledger = _open_ledger()
    if ledger is None:
        typer.echo("no ledger yet")
        return
    log = AnchorLog(anchors) if anchors is not None else AnchorLog.for_workspace()
    try:
        report = ledger.verify_report()
        anchor_problems = verify_anchors(ledger, log) if log.path.exists() else []
    except DpopsError as exc:
        _fail(exc)
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
def ledger_fail(
    charge: str = typer.Argument(..., help="Charge id."),
    reason: str = typer.Option(..., "--reason", help="Why the run is known to be dead."),
) -> None:
    """Close a dead `running` charge as `failed_charged`: it read data, so it stays charged in full."""
    from dpops.errors import LedgerError

    ledger = _require_ledger()
    if not reason.strip():
        _fail("a failure needs a reason (--reason)")
    try:
        c = ledger.fail(charge, reason=f"closed by an operator: {reason}")
    except (LedgerError, DpopsError) as exc:
        _fail(exc)
        return
    typer.echo(f"charge {c.id} is {c.state}: charged in full ({c.mechanism.steps} steps)")


@ledger_app.command("release")
def ledger_release(
    charge: str = typer.Argument(..., help="Charge id."),
    reason: str = typer.Option(..., "--reason", help="Why the reservation is released."),
) -> None:
    """Release a reservation that never read data (refused once the charge is running)."""
    ledger = _require_ledger()
    try:
        c = ledger.release(charge, reason=reason)
    except DpopsError as exc:
        _fail(exc)
        return
    typer.echo(f"charge {c.id} released ({reason})")


@ledger_app.command("migrate")
def ledger_migrate(
    grant: Optional[str] = typer.Option(
        None, "--grant", metavar="ROLE", help="PostgreSQL only: create (if missing) the pipeline role ROLE and grant it "
        "exactly what the ledger writes; it owns no table, so it cannot drop, truncate or alter one, nor its triggers."),
    print_sql: bool = typer.Option(False, "--print-sql", help="With --grant: print the role's SQL for a DBA and change nothing."),
) -> None:
    """Bring the ledger's schema to this version, as the admin role (DPOPS_LEDGER_ADMIN_URL, else DPOPS_LEDGER_URL).

    The pipeline's own opens never migrate a PostgreSQL ledger they do not own: they refuse, naming this command.
    """
    from sqlalchemy.exc import DBAPIError, OperationalError

    from dpops.errors import LedgerError, LedgerUnavailableError
    from dpops.ledger import store as ledger_mod

    ws = workspace()
    url = os.environ.get("DPOPS_LEDGER_ADMIN_URL") or ws.ledger_url
    if url.startswith("sqlite:///"):
        if grant:
            _fail("--grant: a pipeline role exists only on PostgreSQL (SQLite has no roles)")
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if print_sql and not grant:
        _fail("--print-sql prints the SQL of --grant ROLE: name the role")
    engine = ledger_mod.Ledger(url, create=False).engine
    try:
        if print_sql:
            for statement in ledger_mod.pipeline_role_sql(engine, grant):
                typer.echo(statement + ";")
            return
        before = ledger_mod.schema_revision(engine)
        if before != ledger_mod.head_revision():
            ledger_mod.ensure_schema(engine)  # refuses, naming the admin URL, a role that may not migrate
            typer.echo(f"ledger schema upgraded from revision {before or 'none'} to {ledger_mod.head_revision()}")
        else:
            typer.echo(f"ledger schema already at revision {before}")
        if grant:
            ledger_mod.grant_pipeline_role(engine, grant)
            typer.echo(f"role {grant!r}: reads the ledger and appends to it, updates only the chain head and the spend "
                       "index, owns nothing")
    except OperationalError as exc:  # the URL may hold a password: name the error class only
        _fail(LedgerUnavailableError(f"the ledger's database could not be reached ({type(exc.orig).__name__})"))
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        _fail(LedgerError(f"role {engine.url.username!r} may not grant roles on the ledger: run `dpops ledger migrate` "
                          "as the admin role (DPOPS_LEDGER_ADMIN_URL)"))
    except DpopsError as exc:
        _fail(exc)
    finally:
        engine.dispose()


@app.command()
def budget(
    dataset: Optional[str] = typer.Argument(None, help="One dataset (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Each dataset's cap, spent, remaining and charges, from the ledger."""
    from dpops.pipeline import report

    ledger = _open_ledger()
    if ledger is None:
        typer.echo("no ledger yet (no run has reserved budget)")
        return
    try:
        budgets = [ledger.budget(dataset, estimate=True)] if dataset else ledger.budgets(estimate=True)
    except DpopsError as exc:
        _fail(exc)
        return
    if as_json:
        typer.echo(json.dumps([report.budget_dict(b) for b in budgets], indent=2))
    else:
        typer.echo(report.budget_table(budgets))


@app.command()
def prepare(
    dataset: str = typer.Argument(..., help="Dataset whose splits to build (a key of params.yaml 'prepare')."),
    params: Path = typer.Option(Path("params.yaml"), help="DVC params file."),
    step: Optional[str] = typer.Option(None, help="One step: ingest, normalize, dedupe or split (default: all, in order)."),
) -> None:
    """Build a dataset's prepared splits (each step is a stage of dvc.yaml)."""
    from dpops.data import prepare as prep

    try:
        out = prep.prepare_from_params(params, dataset, step)
    except DpopsError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(out))


@app.command()
def promote(
    model: str = typer.Argument(..., help="Registered model name, e.g. sst2-sentiment"),
    version: str = typer.Argument(..., help="Model version to promote."),
    alias: Optional[str] = typer.Option(None, help="Alias to set (default: the policy's, 'production')."),
    policy: Path = typer.Option(Path("configs/policy.yaml"), help="Gate policy."),
) -> None:
    """Promote a model version only if the ledger backs it; exit 1 naming every failed condition.

    Re-checks, from the version's ledger charge: committed, dataset within its cap, ledger chain
    verifies, audit passed, utility within the policy for its task and dataset (accuracy; eval
    loss or perplexity). Every decision is recorded (ledger event and model version tag).
    """
    from mlflow.exceptions import MlflowException

    from dpops.pipeline import stages

    try:
        out = stages.promote(str(policy), model, version, alias=alias)
    except (DpopsError, MlflowException) as exc:
        _fail(exc)
        return
    if not out["promote"]:
        _fail(f"{out['model']}: refused. " + " ".join(f"({i}) {r}." for i, r in enumerate(out["reasons"], 1)), 1)
    typer.echo(f"{out['model']}: promoted -> alias {out['alias']!r} (charge {out['charge_id']})")


def _checked_version(model: str, alias: str, dst: Path):
    """The version ``alias`` points to, downloaded into ``dst`` and checked against the ledger
    (:func:`dpops.registry.serving.check`); exit 1, naming every missing condition, when it must not be served."""
    from dpops.registry import serving

    checked = serving.check(workspace(), model, alias, dst)
    if checked.reasons:
        _fail(f"{checked.label}: not served. " + " ".join(f"({i}) {r}." for i, r in enumerate(checked.reasons, 1)), 1)
    return checked


@app.command()
def predict(
    texts: Optional[list[str]] = typer.Argument(None, help="Texts to classify."),
    model: str = typer.Option(..., "--model", help="Registered model name."),
    alias: str = typer.Option("production", help="Model alias to load."),
    file: Optional[Path] = typer.Option(None, "--file", help="Also classify each line of this file."),
) -> None:
    """Print one predicted label per input text, in order (labels only, never the texts).

    Serves only a version the gate promoted under this alias, with the weights bound in the
    ledger: the alias is resolved to a version, that version is downloaded and checked
    (exit 1 naming what is missing), and exactly that checked copy is loaded.
    """
    apply_quiet_env()
    inputs = list(texts or [])
    if file is not None:
        try:
            inputs += [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            _fail(f"{file}: {exc.strerror or exc}")
    if not inputs:
        _fail("nothing to classify: give TEXT arguments or --file")
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="dpops-predict-") as tmp:
        checked = _checked_version(model, alias, Path(tmp))
        loaded = mlflow.pyfunc.load_model(str(checked.local_path))
        labels = list(loaded.predict(pd.DataFrame({"text": inputs}))["label"])
    for label in labels:
        typer.echo(label)


@app.command()
def serve(
    model: str = typer.Argument(..., help="Registered model name."),
    alias: str = typer.Option("production", help="Model alias to serve."),
    port: int = typer.Option(5001, min=1, max=65535, help="Port of the scoring server."),
    host: str = typer.Option("127.0.0.1", help="Address the scoring server listens on."),
) -> None:
    """Run MLflow's scoring server (/ping, /invocations) for the version the gate promoted under ALIAS.

    The same check as `dpops predict` (exit 1 naming what is missing, nothing served); then
    `mlflow models serve --env-manager local` on exactly the checked copy of that version, until
    it is stopped (Ctrl-C or SIGTERM stop the server too).
    """
    apply_quiet_env()
    import shutil
    import tempfile

    from dpops.registry import serving

    tmp = Path(tempfile.mkdtemp(prefix="dpops-serve-"))
    try:
        checked = _checked_version(model, alias, tmp)
        typer.echo(f"{checked.label}: the gate promoted it; serving on http://{host}:{port}")
        code = serving.run_scoring_server(checked.local_path, host=host, port=port)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(code)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
