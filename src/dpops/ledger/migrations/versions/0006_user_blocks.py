"""User-to-block map: a user seen in one block is never counted in another, across data versions.

``user_blocks`` holds, per dataset, each user's keyed id (HMAC-SHA256 of the user id under the
workspace fingerprint key, never the raw id) and the block its records were first charged in. It
is written in the reservation's transaction and, like the record, is append-only: triggers named
``dpops_append_only_user_blocks*`` refuse UPDATE and DELETE (and TRUNCATE on PostgreSQL).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_blocks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("user_key", sa.String(64), nullable=False),
        sa.Column("block", sa.String(64), nullable=False),
        sa.UniqueConstraint("dataset_id", "user_key"),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE TRIGGER dpops_append_only_user_blocks BEFORE UPDATE OR DELETE ON user_blocks "
                   "FOR EACH ROW EXECUTE FUNCTION dpops_append_only_refuse()")
        op.execute("CREATE TRIGGER dpops_append_only_user_blocks_truncate BEFORE TRUNCATE ON user_blocks "
                   "FOR EACH STATEMENT EXECUTE FUNCTION dpops_append_only_refuse()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER dpops_append_only_user_blocks_{verb.lower()} BEFORE {verb} ON user_blocks "
                       f"BEGIN SELECT RAISE(ABORT, 'user_blocks: {verb} refused, the ledger is append-only'); END")


def downgrade() -> None:
    op.drop_table("user_blocks")
