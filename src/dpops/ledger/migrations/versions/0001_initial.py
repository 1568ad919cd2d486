"""The ledger's first schema: datasets, charges (immutable), events (hash-chained).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("unit", sa.String(20), nullable=False),
        sa.Column("contribution_bound", sa.Integer, nullable=True),
        sa.Column("delta", sa.Double, nullable=False),
        sa.Column("epsilon_cap", sa.Double, nullable=False),
        sa.Column("accountant", sa.String(50), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("head_seq", sa.Integer, nullable=False),
        sa.Column("head_hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "charges",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("kind", sa.String(50), nullable=False),
        sa.Column("sampler", sa.String(20), nullable=False),
        sa.Column("noise_multiplier", sa.Double, nullable=False),
        sa.Column("sample_rate", sa.Double, nullable=False),
        sa.Column("steps_planned", sa.Integer, nullable=False),
        sa.Column("max_grad_norm", sa.Double, nullable=False),
        sa.Column("unit", sa.String(20), nullable=False),
        sa.Column("neighbouring", sa.String(20), nullable=False),
        sa.Column("n_records", sa.Integer, nullable=False),
        sa.Column("job", sa.String(200), nullable=False),
        sa.Column("data_version", sa.String(200), nullable=False),
        sa.Column("flow_run_id", sa.String(100), nullable=True),
        sa.Column("code_version", sa.String(100), nullable=True),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("lease_expires_at", sa.String(40), nullable=False),
    )
    op.create_index("ix_charges_dataset_id", "charges", ["dataset_id"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("charge_id", sa.String(36), nullable=True),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("dataset_id", "seq"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_index("ix_charges_dataset_id", "charges")
    op.drop_table("charges")
    op.drop_table("datasets")
