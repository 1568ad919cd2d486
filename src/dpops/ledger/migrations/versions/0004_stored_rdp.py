"""Spend totals keep the one-step RDP curve of their mechanism over the filter's orders.

A dataset's guaranteed epsilon is ``sum(steps * RDP_one_step(sigma, q))`` over its spend totals.
Computing a one-step curve costs about 2 ms per distinct (sigma, q) (two independent
implementations, fractional orders), so a fresh process facing a history of 1,000 distinct
mechanisms (e.g. runs fitted to what the budget has left) spent seconds before it could admit or
report. The curve is a pure function of (sigma, q) and the fixed grid ``FILTER_ORDERS``: it is
computed once, by the admission that creates the total, and stored beside it as JSON.

It is derived data like the totals: ``Ledger.verify`` recomputes every stored curve and reports a
difference as an edit. Existing totals are backfilled here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("spend_totals", sa.Column("rdp_per_step", sa.Text, nullable=True))
    from dpops.privacy import filters

    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, noise_multiplier, sample_rate FROM spend_totals")).all()
    for row_id, sigma, q in rows:
        conn.execute(sa.text("UPDATE spend_totals SET rdp_per_step = :r WHERE id = :i"),
                     {"r": json.dumps(filters.filter_rdp_one_step(sigma, q)), "i": row_id})


def downgrade() -> None:
    with op.batch_alter_table("spend_totals") as batch:
        batch.drop_column("rdp_per_step")
