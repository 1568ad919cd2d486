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
    """``message`` cut to at most ``limit`` characters, ending with how many were cut."""
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
    """An illegal ledger operation (unknown charge, forbidden state change, broken chain)."""


class PrivacyError(DpopsError, RuntimeError):
    """Training would not match what the accountant assumes (sampler, sample rate, steps)."""


class TrainingError(DpopsError, RuntimeError):
    """A training process failed, was killed, or left no result. Its charge stays charged in full."""
