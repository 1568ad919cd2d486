"""Blocks: append-only partitions of a dataset with their own caps (Sage-style).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blocks",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("epsilon_cap", sa.Double, nullable=False),
        sa.Column("n_records", sa.Integer, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.UniqueConstraint("dataset_id", "name"),
    )
    op.create_table(
        "charge_blocks",
        sa.Column("charge_id", sa.String(36), sa.ForeignKey("charges.id"), primary_key=True),
        sa.Column("block_id", sa.Integer, sa.ForeignKey("blocks.id"), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("charge_blocks")
    op.drop_table("blocks")
