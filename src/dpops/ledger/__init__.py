"""The privacy-budget ledger: the system of record for privacy spend.

* :mod:`.states`: the vocabulary and value objects (charge states, ``Charge``, budgets); pure Python.
* :mod:`.store`: :class:`~dpops.ledger.store.Ledger`, whose methods live by concern in
  :mod:`.registration` (datasets, blocks), :mod:`.admission` (reserve), :mod:`.lifecycle` (start
  to commit, bindings, evidence, gate decisions), :mod:`.reads` (charges, budgets, history) and
  :mod:`.verify` (recompute everything from the events).
* :mod:`.schema` (tables, the schema's lifecycle: open checks, upgrade migrates), :mod:`.roles`
  (the PostgreSQL pipeline role), :mod:`.chain` (event hashes and their replay), :mod:`.spend`
  (the spend index's arithmetic), :mod:`.engine` (engines, lock timeouts, column bounds).
* :mod:`.anchors` (chain heads signed outside the database), :mod:`.workspace` (the workspace's
  ledger), ``migrations/`` (Alembic). See docs/architecture.md, "The ledger".

Names are loaded on first use, so that ``from dpops.ledger.states import Charge`` (what the
trainer reads) does not load SQLAlchemy.
"""

import importlib
from typing import Any

_WHERE = {
    "Ledger": "store", "VerifyReport": "chain", "upgrade": "schema", "migrate_schema": "schema",
    "schema_revision": "schema", "head_revision": "schema", "grant_pipeline_role": "roles",
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
