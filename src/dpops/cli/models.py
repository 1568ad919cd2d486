"""``dpops promote``, ``dpops predict``, ``dpops serve``: model versions through the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpops.cli.common import fail
from dpops.config.workspace import apply_quiet_env, workspace
from dpops.errors import DpopsError


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

    from dpops.pipeline import publish

    try:
        out = publish.promote(str(policy), model, version, alias=alias)
    except (DpopsError, MlflowException) as exc:
        fail(exc)
        return
    if not out["promote"]:
        fail(f"{out['model']}: refused. " + " ".join(f"({i}) {r}." for i, r in enumerate(out["reasons"], 1)), 1)
    typer.echo(f"{out['model']}: promoted -> alias {out['alias']!r} (charge {out['charge_id']})")


def _checked_version(model: str, alias: str, dst: Path):
    """The version ``alias`` points to, downloaded into ``dst`` and checked against the ledger
    (:func:`dpops.registry.serving.check`); exit 1, naming every missing condition, when it must not be served."""
    from dpops.registry import serving

    checked = serving.check(workspace(), model, alias, dst)
    if checked.reasons:
        fail(f"{checked.label}: not served. " + " ".join(f"({i}) {r}." for i, r in enumerate(checked.reasons, 1)), 1)
    return checked


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
            fail(f"{file}: {exc.strerror or exc}")
    if not inputs:
        fail("nothing to classify: give TEXT arguments or --file")
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="dpops-predict-") as tmp:
        checked = _checked_version(model, alias, Path(tmp))
        loaded = mlflow.pyfunc.load_model(str(checked.local_path))
        labels = list(loaded.predict(pd.DataFrame({"text": inputs}))["label"])
    for label in labels:
        typer.echo(label)


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
