"""Materialized spend: each charge's current state and each scope's step totals per mechanism.

Admission used to re-read every charge and event of a dataset under its lock (O(history)). These
two tables let it read a handful of rows instead. They are derived data: the charges and the
hash-chained events stay the record, and ``Ledger.verify`` recomputes both tables from them.

* ``charge_states``: one row per charge, its state (the last state event) and the steps it counts
  now (planned while reserved/running/failed_charged, steps run once committed, 0 once released
  or expired).
* ``spend_totals``: per dataset, scope and mechanism (noise multiplier, sample rate), the sum of
  the counted steps. Scope ``""`` holds charges that read the whole dataset; a block's name holds
  charges that read that block. RDP is linear in steps, so these totals give the filter's RDP
  exactly.

Existing ledgers are backfilled from their events.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_STATES = ("reserved", "running", "committed", "failed_charged", "released", "expired")


def upgrade() -> None:
    op.create_table(
        "charge_states",
        sa.Column("charge_id", sa.String(36), sa.ForeignKey("charges.id"), primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("steps_counted", sa.Integer, nullable=False),
        sa.Column("lease_expires_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_charge_states_dataset_state", "charge_states", ["dataset_id", "state"])
    op.create_table(
        "spend_totals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("scope", sa.String(200), nullable=False),
        sa.Column("noise_multiplier", sa.Double, nullable=False),
        sa.Column("sample_rate", sa.Double, nullable=False),
        sa.Column("steps", sa.Integer, nullable=False),
        sa.UniqueConstraint("dataset_id", "scope", "noise_multiplier", "sample_rate"),
    )
    # charge() and transitions read one charge's events.
    op.create_index("ix_events_charge_id", "events", ["charge_id"])
    _backfill(op.get_bind())


def _backfill(conn: sa.Connection) -> None:
    state: dict[str, str] = {}
    steps_run: dict[str, int] = {}
    for charge_id, kind, payload in conn.execute(sa.text(
        "SELECT charge_id, kind, payload FROM events WHERE charge_id IS NOT NULL ORDER BY dataset_id, seq"
    )):
        if kind in _STATES:
            state[charge_id] = kind
            if kind == "committed":
                steps_run[charge_id] = int(json.loads(payload)["steps_run"])
    scopes: dict[str, list[str]] = {}
    for charge_id, block in conn.execute(sa.text(
        "SELECT cb.charge_id, b.name FROM charge_blocks cb JOIN blocks b ON b.id = cb.block_id"
    )):
        scopes.setdefault(charge_id, []).append(block)
    totals: dict[tuple[int, str, float, float], int] = {}
    for cid, ds, sigma, q, planned, lease in conn.execute(sa.text(
        "SELECT id, dataset_id, noise_multiplier, sample_rate, steps_planned, lease_expires_at FROM charges"
    )):
        s = state.get(cid, "reserved")
        counted = 0 if s in ("released", "expired") else steps_run.get(cid, planned) if s == "committed" else planned
        conn.execute(sa.text(
            "INSERT INTO charge_states (charge_id, dataset_id, state, steps_counted, lease_expires_at) "
            "VALUES (:c, :d, :s, :n, :l)"
        ), {"c": cid, "d": ds, "s": s, "n": counted, "l": lease})
        for scope in scopes.get(cid, [""]):
            key = (ds, scope, sigma, q)
            totals[key] = totals.get(key, 0) + counted
    for (ds, scope, sigma, q), steps in totals.items():
        conn.execute(sa.text(
            "INSERT INTO spend_totals (dataset_id, scope, noise_multiplier, sample_rate, steps) VALUES (:d, :s, :sigma, :q, :n)"
        ), {"d": ds, "s": scope, "sigma": sigma, "q": q, "n": steps})


def downgrade() -> None:
    op.drop_index("ix_events_charge_id", "events")
    op.drop_table("spend_totals")
    op.drop_index("ix_charge_states_dataset_state", "charge_states")
    op.drop_table("charge_states")
