"""The error hierarchy. Every class also inherits the builtin a caller would expect.

Error messages reach the console, Prefect's persisted logs and the refusal artifact, so they are
released: they name files, rows, columns and config fields, never a value read from a data file.
Every dpops error's message is also cut to :data:`MAX_MESSAGE_CHARS`, so no input can make one
huge; a foreign exception (pandas, DVC) enters a message only through :func:`describe_exception`.
"""

import re

#: The longest message a dpops error carries; longer ones are cut, saying how much was cut.
MAX_MESSAGE_CHARS = 2000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to at most ``limit`` characters, ending with how many were cut.

    >>> bounded("x" * 50, limit=30)
    'xxxxxx [... 44 characters cut]'
    >>> len(ConfigError("y" * 5000).args[0]) == MAX_MESSAGE_CHARS
    True
    """
    if len(message) <= limit:
        return message
    marker = " [... {} characters cut]"
    kept = limit - len(marker.format(len(message)))  # the count cut never has more digits than this
    return message[:kept] + marker.format(len(message) - kept)


def describe_exception(exc: BaseException) -> str:
    """A foreign exception as its class name and, when its message gives one, the line number.

    pandas' and DVC's messages may carry a line of the file, a path or a content hash, so their
    text never enters a dpops message.

    >>> describe_exception(ValueError("Expected 2 fields in line 3, saw 3"))
    'ValueError at line 3'
    """
    line = re.search(r"\bline (\d+)", str(exc)[:MAX_MESSAGE_CHARS])
    return type(exc).__name__ + (f" at line {line.group(1)}" if line else "")


class DpopsError(Exception):
    """Base class of every error dpops raises on purpose. Its message is at most
    :data:`MAX_MESSAGE_CHARS` long."""

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (bounded(args[0]),)
        super().__init__(*args)


class ConfigError(DpopsError, ValueError):
    """A configuration file or field is invalid. The message names the file and field."""


class DataValidationError(DpopsError, ValueError):
    """The data failed to load or failed its expectation suite. Nothing was charged."""


class BudgetExceededError(DpopsError, RuntimeError):
    """The ledger refused a charge: it would take a dataset past its epsilon cap."""


class LedgerError(DpopsError, RuntimeError):
    """An illegal ledger operation (unknown charge, forbidden state change, broken chain).

    The subclasses below name the refusals a caller may expect and handle one by one; every other
    LedgerError (a broken chain, an unknown filter, a refused field) is a fault to propagate.
    """


class LedgerSchemaError(LedgerError):
    """The ledger's schema is not the one this code needs: behind it (run ``dpops ledger upgrade``)
    or ahead of it (migrated by a newer dpops). Opening a ledger never migrates one that exists."""


class DatasetNotRegisteredError(LedgerError):
    """The dataset (or the dataset a ``budget_of`` link names) is not registered in the ledger."""


class ChargeNotFoundError(LedgerError):
    """No charge has this id."""


class BlockExistsError(LedgerError):
    """The dataset already has a block of this name; blocks are append-only."""


class IllegalTransitionError(LedgerError):
    """A charge cannot move from its state to the one asked (see ``dpops.ledger.TRANSITIONS``)."""


class LeaseExpiredError(LedgerError):
    """A reservation's lease ran out before it started; it counts nothing. Plan and reserve again."""


class PrivacyError(DpopsError, RuntimeError):
    """Training would not match what the accountant assumes (sampler, sample rate, steps)."""


class TrainingError(DpopsError, RuntimeError):
    """A training process failed, was killed, or left no result. Its charge stays charged in full."""


class LedgerUnavailableError(DpopsError, RuntimeError):
    """The ledger could not be reached or stayed locked past ``DPOPS_LEDGER_LOCK_TIMEOUT``. Nothing changed."""


#: The exit code of every ``dpops`` command, by what went wrong (README, "Exit codes"). 1 is kept
#: for a check that ran and said no (``ledger verify`` found tampering, the gate or serving refused).
EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_LEDGER_UNAVAILABLE, EXIT_RUN_FAILED = 0, 1, 2, 3, 4, 5


def exit_code(exc: BaseException) -> int:
    """The documented exit code of a dpops error: 2 bad input (a config or data file), 3 refused by
    the ledger or the privacy checks, 4 ledger unavailable, 5 the run failed after it started.

    >>> [exit_code(e("...")) for e in (ConfigError, DataValidationError, BudgetExceededError, LedgerError, PrivacyError)]
    [2, 2, 3, 3, 3]
    >>> exit_code(LedgerUnavailableError("...")), exit_code(TrainingError("...")), exit_code(KeyError("3"))
    (4, 5, 2)
    """
    if isinstance(exc, LedgerUnavailableError):
        return EXIT_LEDGER_UNAVAILABLE
    if isinstance(exc, (ConfigError, DataValidationError)):
        return EXIT_BAD_INPUT
    if isinstance(exc, TrainingError):
        return EXIT_RUN_FAILED
    if isinstance(exc, DpopsError):
        return EXIT_REFUSED
    return EXIT_BAD_INPUT  # a foreign error on the command's arguments (e.g. MLflow: no such model version)
