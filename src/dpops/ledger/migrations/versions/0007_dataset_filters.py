"""Per-dataset privacy filters; stored one-step curves recomputed with the public accountant.

A dataset's privacy filter (its RDP orders and the share of delta each gets) is chosen once, when
it is registered, and stored in its ``registered`` event; ``datasets.filter_spec`` holds the same
as canonical JSON (``rdp-filter-v2``). Datasets registered before this revision keep
``rdp-filter-v1`` (the fixed grid ``FILTER_ORDERS``, delta split evenly) and a NULL spec.

The stored one-step RDP curves (derived data, migration 0004) are recomputed: the curve is now
``dp_accounting``'s public ``RdpAccountant`` value, with a quadrature bound at the fractional
orders where its series does not converge, which it used to record as infinity (an order lost to
that mechanism forever). Elsewhere the value is the same to rounding. ``Ledger.verify`` recomputes
every curve as before.

``filter_spec`` is one of the dataset's terms: the append-only trigger of migration 0005 that
refuses an UPDATE of the terms covers it from here on.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


#: The terms migration 0005 protects, and this revision's addition.
OLD_TERMS = ("id", "name", "unit", "contribution_bound", "delta", "epsilon_cap", "accountant", "created_at")
TERMS = (*OLD_TERMS, "filter_spec")


def _protect(terms: tuple[str, ...]) -> None:
    """(Re)create the trigger refusing an UPDATE of ``terms`` of a ``datasets`` row."""
    message = "datasets: UPDATE of its terms refused, the ledger is append-only"
    if op.get_bind().dialect.name == "postgresql":
        changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in terms)
        op.execute(f"""
            CREATE OR REPLACE FUNCTION dpops_append_only_datasets() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF {changed} THEN
                    RAISE EXCEPTION '{message}';
                END IF;
                RETURN NEW;
            END $$""")
        return
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in terms)
    op.execute("DROP TRIGGER IF EXISTS dpops_append_only_datasets_update")
    op.execute(f"CREATE TRIGGER dpops_append_only_datasets_update BEFORE UPDATE ON datasets "
               f"WHEN {changed} BEGIN SELECT RAISE(ABORT, '{message}'); END")


def upgrade() -> None:
    op.add_column("datasets", sa.Column("filter_spec", sa.Text, nullable=True))
    _protect(TERMS)
    from dpops.privacy import filters

    conn = op.get_bind()
    rows = conn.execute(sa.text(
        "SELECT t.id, t.noise_multiplier, t.sample_rate, d.accountant FROM spend_totals t JOIN datasets d ON d.id = t.dataset_id"
    )).all()
    for row_id, sigma, q, accountant in rows:
        if accountant != filters.FILTER_V1:
            continue  # only v1 datasets exist before this revision; anything else is left for verify to report
        conn.execute(sa.text("UPDATE spend_totals SET rdp_per_step = :r WHERE id = :i"),
                     {"r": json.dumps(filters.V1_FILTER.one_step(sigma, q)), "i": row_id})


def downgrade() -> None:
    _protect(OLD_TERMS)
    op.drop_column("datasets", "filter_spec")
