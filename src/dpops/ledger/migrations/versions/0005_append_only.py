"""Append-only, enforced by the database: triggers refuse to rewrite the record.

``events``, ``charges``, ``charge_blocks`` and ``blocks`` refuse every UPDATE and DELETE (and
TRUNCATE on PostgreSQL); ``datasets`` refuses DELETE and any UPDATE of its terms, while its chain
head (``head_seq``, ``head_hash``) still moves with each appended event. The derived spend index
(``charge_states``, ``spend_totals``) stays writable: the ledger rewrites it, and verify
recomputes it. Every trigger and function is named ``dpops_append_only_*``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

#: Tables whose rows are never updated or deleted.
APPEND_ONLY = ("events", "charges", "charge_blocks", "blocks")
#: Columns of ``datasets`` that are its registered terms (everything but the chain head).
DATASET_TERMS = ("id", "name", "unit", "contribution_bound", "delta", "epsilon_cap", "accountant", "created_at")


def _message(table: str, what: str) -> str:
    return f"{table}: {what} refused, the ledger is append-only"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
    else:
        _upgrade_sqlite()


def _upgrade_sqlite() -> None:
    for table in APPEND_ONLY:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER dpops_append_only_{table}_{verb.lower()} BEFORE {verb} ON {table} "
                       f"BEGIN SELECT RAISE(ABORT, '{_message(table, verb)}'); END")
    changed = " OR ".join(f"NEW.{c} IS NOT OLD.{c}" for c in DATASET_TERMS)
    op.execute("CREATE TRIGGER dpops_append_only_datasets_update BEFORE UPDATE ON datasets "
               f"WHEN {changed} BEGIN SELECT RAISE(ABORT, '{_message('datasets', 'UPDATE of its terms')}'); END")
    op.execute("CREATE TRIGGER dpops_append_only_datasets_delete BEFORE DELETE ON datasets "
               f"BEGIN SELECT RAISE(ABORT, '{_message('datasets', 'DELETE')}'); END")


def _upgrade_postgresql() -> None:
    op.execute("""
        CREATE OR REPLACE FUNCTION dpops_append_only_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '%: % refused, the ledger is append-only', TG_TABLE_NAME, TG_OP;
        END $$""")
    changed = " OR ".join(f"NEW.{c} IS DISTINCT FROM OLD.{c}" for c in DATASET_TERMS)
    op.execute(f"""
        CREATE OR REPLACE FUNCTION dpops_append_only_datasets() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF {changed} THEN
                RAISE EXCEPTION 'datasets: UPDATE of its terms refused, the ledger is append-only';
            END IF;
            RETURN NEW;
        END $$""")
    for table in APPEND_ONLY:
        op.execute(f"CREATE TRIGGER dpops_append_only_{table} BEFORE UPDATE OR DELETE ON {table} "
                   "FOR EACH ROW EXECUTE FUNCTION dpops_append_only_refuse()")
    for table in (*APPEND_ONLY, "datasets"):
        op.execute(f"CREATE TRIGGER dpops_append_only_{table}_truncate BEFORE TRUNCATE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION dpops_append_only_refuse()")
    op.execute("CREATE TRIGGER dpops_append_only_datasets_update BEFORE UPDATE ON datasets "
               "FOR EACH ROW EXECUTE FUNCTION dpops_append_only_datasets()")
    op.execute("CREATE TRIGGER dpops_append_only_datasets_delete BEFORE DELETE ON datasets "
               "FOR EACH ROW EXECUTE FUNCTION dpops_append_only_refuse()")


def downgrade() -> None:
    pg = op.get_bind().dialect.name == "postgresql"
    if pg:
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS dpops_append_only_{table} ON {table}")
        for table in (*APPEND_ONLY, "datasets"):
            op.execute(f"DROP TRIGGER IF EXISTS dpops_append_only_{table}_truncate ON {table}")
        for name in ("datasets_update", "datasets_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS dpops_append_only_{name} ON datasets")
        op.execute("DROP FUNCTION IF EXISTS dpops_append_only_refuse()")
        op.execute("DROP FUNCTION IF EXISTS dpops_append_only_datasets()")
        return
    for table in APPEND_ONLY:
        for verb in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS dpops_append_only_{table}_{verb}")
    op.execute("DROP TRIGGER IF EXISTS dpops_append_only_datasets_update")
    op.execute("DROP TRIGGER IF EXISTS dpops_append_only_datasets_delete")
