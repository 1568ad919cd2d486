"""What every ``dpops`` command shares: failing with the documented exit code, opening the ledger."""

from __future__ import annotations

from typing import Optional

import typer

from dpops.errors import EXIT_BAD_INPUT, DpopsError, exit_code


def fail(exc: BaseException | str, code: Optional[int] = None) -> None:
    """Print ``exc`` and exit: with ``code``, else the documented code of the error (:func:`dpops.errors.exit_code`),
    2 (bad input) for a plain message."""
    typer.secho(f"dpops: {exc}", err=True, fg=typer.colors.RED)
    if code is None:
        code = exit_code(exc) if isinstance(exc, BaseException) else EXIT_BAD_INPUT
    raise typer.Exit(code)


def open_ledger_or_exit(must_exist: bool = True):
    """The workspace's ledger (None if ``must_exist`` and there is none yet); exit 4 if it is unavailable."""
    from dpops.ledger.workspace import open_ledger

    try:
        return open_ledger(must_exist=must_exist)
    except DpopsError as exc:  # locked past DPOPS_LEDGER_LOCK_TIMEOUT, unreachable, or a bad setting
        fail(exc)


def require_ledger():
    """The workspace's ledger; exit 2 if no run has created one yet."""
    ledger = open_ledger_or_exit()
    if ledger is None:
        fail("no ledger yet (no run has reserved budget)")
    return ledger
