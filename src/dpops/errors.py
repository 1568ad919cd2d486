"""The error hierarchy. Every class also inherits the builtin a caller would expect."""


class DpopsError(Exception):
    """Base class of every error dpops raises on purpose."""


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
