"""The private records: reading a DVC-tracked split by keyed fingerprint, validating it, preparing it.

:mod:`.source` resolves and reads splits; :mod:`.validation` validates them (Great Expectations,
boolean results only); :mod:`.prepare` is the DVC pipeline's preparation (ingest, normalise, dedupe, split).
"""

from dpops.data.source import DataRef, fingerprint, load_split, resolve
from dpops.data.validation import validate

__all__ = [
    "DataRef",
    "fingerprint",
    "load_split",
    "resolve",
    "validate",
]
