"""The PostgreSQL pipeline role: what the pipeline may read, append and update, and nothing more.
"""

from __future__ import annotations

import re

from sqlalchemy import (
    text,
)
from sqlalchemy.engine import Engine

from dpops.errors import (
    ConfigError,
    LedgerError,
    LedgerSchemaError,
)
from dpops.ledger.schema import _PG_MIGRATION_LOCK, Base

#: Columns the pipeline role may UPDATE, by table: the chain head and the derived spend index, which
#: the ledger moves with each event. ``blocks.id`` is there only because PostgreSQL's ``SELECT ... FOR
#: UPDATE`` (admission locks the blocks a run reads) needs an UPDATE privilege on some column; the
#: append-only triggers refuse every UPDATE of ``blocks`` all the same. Every other table the role
#: may only read and append to.
PIPELINE_UPDATES: dict[str, tuple[str, ...]] = {
    "datasets": ("head_seq", "head_hash"),
    "blocks": ("id",),
    "charge_states": ("state", "steps_counted"),
    "spend_totals": ("steps",),
}


_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def pipeline_role_sql(engine: Engine, role: str) -> list[str]:
    """The SQL that makes ``role`` the ledger's pipeline role on PostgreSQL (see
    :func:`grant_pipeline_role`); reads the catalog, changes nothing. For a DBA to review or run."""
    if engine.dialect.name != "postgresql":
        raise ConfigError("a pipeline role exists only on PostgreSQL (SQLite has no roles)")
    if not _ROLE_NAME.fullmatch(role):
        raise ConfigError("--grant: a role name is 1-63 lower-case letters, digits or underscores, not starting with a digit")
    with engine.connect() as conn:
        database = conn.scalar(text("SELECT current_database()"))
        tables = [t for t in (*Base.metadata.tables, "alembic_version")
                  if conn.scalar(text("SELECT to_regclass(:t)"), {"t": t}) is not None]
        present = {(t, c) for t, c in conn.execute(text(  # a ledger behind head lacks the newer columns
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = current_schema()"))}
        sequences = sorted({s for t in tables for c in ([] if t == "alembic_version" else Base.metadata.tables[t].columns)
                            if (t, c.name) in present
                            and (s := conn.scalar(text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": t, "c": c.name}))})
        schema = conn.scalar(text("SELECT relnamespace::regnamespace::text FROM pg_class WHERE oid = to_regclass('alembic_version')"))
    if not tables or schema is None:
        raise LedgerSchemaError("the ledger has no schema yet: run `dpops ledger upgrade` first")
    q = f'"{role}"'
    sql = [
        f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE {q} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS; END IF; END $$",
        f'GRANT CONNECT ON DATABASE "{database}" TO {q}',
        f"GRANT USAGE ON SCHEMA {schema} TO {q}",
    ]
    for t in tables:
        sql.append(f"REVOKE ALL ON TABLE {t} FROM {q}")  # exactly what follows, also on a rerun
        if t == "alembic_version":
            sql.append(f"GRANT SELECT ON TABLE {t} TO {q}")
            continue
        sql.append(f"GRANT SELECT, INSERT ON TABLE {t} TO {q}")
        if t in PIPELINE_UPDATES:
            sql.append(f"GRANT UPDATE ({', '.join(PIPELINE_UPDATES[t])}) ON TABLE {t} TO {q}")
    sql += [f"GRANT USAGE, SELECT ON SEQUENCE {s} TO {q}" for s in sequences]
    return sql


def grant_pipeline_role(engine: Engine, role: str) -> list[str]:
    """Create (if missing) the PostgreSQL role the pipeline connects as, and grant it exactly what the
    ledger writes: SELECT on every ledger table, INSERT on them, UPDATE only of
    :data:`PIPELINE_UPDATES`, and the tables' sequences. It owns nothing, so it cannot DROP,
    TRUNCATE or ALTER a table, disable or drop a trigger, or migrate; as no superuser it cannot set
    ``session_replication_role``. Idempotent; rerun it after each migration that adds a table.
    ``engine`` connects as the admin (the tables' owner). Returns the statements run.

    Refuses a role that could take the owner's rights: a superuser, a CREATEROLE role, or a member
    of the tables' owner.
    """
    sql = pipeline_role_sql(engine, role)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        # A non-owner's GRANT only warns ("no privileges were granted"): refuse it here instead.
        if not conn.scalar(text("SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class "
                                "WHERE oid = to_regclass('alembic_version')")):
            raise LedgerError(f"role {engine.url.username or 'this role'!r} does not own the ledger's tables and may not "
                              "grant on them: run `dpops ledger upgrade` as the admin role (DPOPS_LEDGER_ADMIN_URL)")
        for statement in sql:
            conn.exec_driver_sql(statement)
        unsafe = conn.execute(text(
            "SELECT r.rolsuper OR r.rolcreaterole OR pg_has_role(r.oid, c.relowner, 'MEMBER') FROM pg_roles r, pg_class c "
            "WHERE r.rolname = :role AND c.oid = to_regclass('alembic_version')"), {"role": role}).scalar()
        if unsafe:  # raised inside the transaction: nothing above is kept
            raise LedgerError(f"role {role!r} is a superuser, may create roles, or is a member of the ledger's owner: "
                              "it could drop the record; use a plain role")
    return sql
