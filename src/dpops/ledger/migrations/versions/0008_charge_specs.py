"""The digest of each charge's configs: ``charges.spec_hash``.

A reservation stores the digest of the run's job and dataset configs
(:class:`dpops.config.spec.RunSpec`, ``sha256:<hex>``); the train stage and every training
process refuse configs whose digest differs. Charges reserved before this revision have NULL
(nothing to compare). ``charges`` refuses every UPDATE (migration 0005), the new column included,
and the digest is copied into the charge's ``reserved`` event, which ``Ledger.verify`` compares
with the row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("charges", sa.Column("spec_hash", sa.String(80), nullable=True))


def downgrade() -> None:
    op.drop_column("charges", "spec_hash")
