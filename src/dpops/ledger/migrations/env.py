"""Alembic environment of the ledger. Run through :func:`dpops.ledger.store.upgrade`, which passes a
connection already holding the database's migration lock."""

from alembic import context
from sqlalchemy import create_engine

from dpops.ledger.schema import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:  # plain `alembic upgrade head` from a shell
        engine = create_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as conn:
            context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
