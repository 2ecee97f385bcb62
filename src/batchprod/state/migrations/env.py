"""Alembic environment of the state store: batchprod hands over its connection (in one transaction it
holds); the ``alembic`` command line gives a URL with ``-x url=...`` or ``sqlalchemy.url``."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

config = context.config


def run(connection: sa.Connection) -> None:
    context.configure(connection=connection, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("give the database: alembic -x url=postgresql+psycopg://... upgrade head")
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        run(conn)
    engine.dispose()
