"""The privacy-budget ledger: the system of record for privacy spend.

:mod:`.states` (the vocabulary and value objects; pure Python), :mod:`.store` (the SQLAlchemy
store: schema, admission, the hash chain, the spend index, verification), :mod:`.anchors`
(chain heads signed outside the database), :mod:`.workspace` (the workspace's ledger),
``migrations/`` (Alembic). See docs/architecture.md, "The ledger".

Names are loaded on first use, so that ``from dpops.ledger.states import Charge`` (what the
trainer reads) does not load SQLAlchemy.
"""

import importlib
from typing import Any

_WHERE = {
    "Ledger": "store", "VerifyReport": "store", "upgrade": "store", "schema_revision": "store", "head_revision": "store",
    "Charge": "states", "DatasetBudget": "states", "BlockBudget": "states", "ChainHead": "states",
    "RESERVED": "states", "RUNNING": "states", "COMMITTED": "states", "FAILED_CHARGED": "states",
    "RELEASED": "states", "EXPIRED": "states", "TRANSITIONS": "states",
    "AnchorLog": "anchors", "verify_anchors": "anchors", "open_ledger": "workspace",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"dpops.ledger.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'dpops.ledger' has no attribute {name!r}")
