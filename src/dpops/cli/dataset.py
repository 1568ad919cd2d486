"""``dpops dataset`` and ``dpops prepare``: datasets in the ledger, and their DVC preparation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpops.cli.common import fail, open_ledger_or_exit
from dpops.errors import DpopsError
from dpops.privacy import filters

dataset_app = typer.Typer(no_args_is_help=True, help="Datasets in the ledger.")


@dataset_app.command("register")
def dataset_register(
    config: Path = typer.Argument(..., help="Dataset config, e.g. configs/datasets/sst2.yaml"),
) -> None:
    """Register a dataset's unit, delta, cap and privacy filter in the ledger (no-op if registered with
    the same terms). The filter is the config's ``privacy.filter_orders``, else the grid
    (:data:`dpops.privacy.filters.GRID_FILTER`): a job's first run chooses a sharper one from its mechanism."""
    from dpops.config.loading import load_dataset_config

    try:
        cfg = load_dataset_config(config)
        ledger = open_ledger_or_exit(must_exist=False)
        ledger.register_dataset(name=cfg.ledger_name, unit=cfg.unit, delta=cfg.privacy.delta, epsilon_cap=cfg.privacy.epsilon_cap,
                                contribution_bound=cfg.contribution_bound, source=cfg.source,
                                linked_from=cfg.name if cfg.budget_of else None,
                                privacy_filter=cfg.privacy.privacy_filter or filters.GRID_FILTER,
                                filter_from_config=cfg.privacy.filter_orders is not None)
    except DpopsError as exc:
        fail(exc)
        return
    typer.echo(f"dataset {cfg.name!r}: unit {cfg.unit}, delta {cfg.privacy.delta:g}, cap {cfg.privacy.epsilon_cap:g}")


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
        fail(exc)
        return
    typer.echo(json.dumps(out))
