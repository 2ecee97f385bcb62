"""The state store's schema: created fresh at its head revision, or brought there by Alembic.

A new store is created from the models in ``store.py`` and stamped with their revision (no migration
run: prepare stays fast). An existing one whose ``alembic_version`` is older is upgraded by the
revisions in ``state/migrations/versions``; a per-run file from before Alembic (no version table, but
the ``run``, ``job`` and ``attempt`` tables) is recognised as the baseline, completed (columns and
tables that older versions added later), stamped ``0001`` and upgraded. All of it in one transaction,
serialized between processes (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock): a failed
upgrade leaves the database as it was.

Operators can also run Alembic themselves on a central database::

    alembic -c <path to batchprod/state/migrations/alembic.ini> -x url=postgresql+psycopg://... upgrade head
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from batchprod.errors import RunError

if TYPE_CHECKING:
    from batchprod.state.store import StateStore

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"
#: every revision this batchprod knows, oldest first
REVISIONS = ("0001", "0002", "0003", "0004")
#: PostgreSQL advisory lock key serializing schema changes ("bprd")
_PG_LOCK = 0x62707264


def alembic_config(connection: Any = None, url: str | None = None) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def revision(conn: sa.Connection) -> str | None:
    """The database's Alembic revision; None when it has no version table."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    revs = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
    return revs[0] if len(revs) == 1 else f"<{len(revs)} versions>"


def ensure_schema(store: StateStore, create: bool) -> None:
    """Make sure the store's database is at this batchprod's schema, or say in one line why not."""
    from batchprod.state.store import CORE_TABLES, SCHEMA_REVISION, TABLES

    with store.engine.connect() as conn:
        rev = revision(conn)
        if rev == SCHEMA_REVISION:
            return
        tables = set(sa.inspect(conn).get_table_names())
    if rev is None:
        ours = tables & set(TABLES)
        if not ours:
            if not create:
                if store.central:
                    raise RunError(f"{store.where}: no batchprod runs in this database (prepare or submit "
                                   "one with --db first)")
                raise store._damaged("no 'run' table")
            others = sorted(tables - {"sqlite_sequence"})
            if others:
                raise RunError(f"{store.where}: not a batchprod database (it holds other tables: "
                               f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}); give an empty "
                               "database or schema")
            _create(store)
            return
        for t in CORE_TABLES:
            if t not in tables:
                raise store._damaged(f"no '{t}' table")
    elif rev not in REVISIONS:
        raise RunError(f"{store.where}: schema revision {rev!r} is not one this batchprod knows "
                       f"(its newest is {SCHEMA_REVISION}): written by a newer batchprod, or not a batchprod "
                       "database")
    _upgrade(store)


@contextlib.contextmanager
def ddl_transaction(store: StateStore) -> Iterator[sa.Connection]:
    """One transaction for schema changes, held against every other writer of the database."""
    if store.dialect == "sqlite":
        # pysqlite would run DDL outside any transaction: take the transaction ourselves
        from sqlalchemy.pool import NullPool

        eng = sa.create_engine(store.url, poolclass=NullPool)

        @sa.event.listens_for(eng, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA busy_timeout=30000")

        @sa.event.listens_for(eng, "begin")
        def _begin(conn: sa.Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with eng.begin() as conn:
                yield conn
        finally:
            eng.dispose()
    else:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK})")
            yield conn


def _create(store: StateStore) -> None:
    from batchprod.state.store import EVENT_TRIGGER, SCHEMA_REVISION, _md, version_t

    with ddl_transaction(store) as conn:
        if revision(conn) == SCHEMA_REVISION:
            return  # another process made it while we waited
        _md.create_all(conn)
        for stmt in EVENT_TRIGGER[store.dialect]:
            conn.exec_driver_sql(stmt)
        conn.execute(version_t.insert().values(version_num=SCHEMA_REVISION))


def _upgrade(store: StateStore) -> None:
    from alembic import command

    from batchprod.state.store import SCHEMA_REVISION

    with ddl_transaction(store) as conn:
        rev = revision(conn)
        if rev == SCHEMA_REVISION:
            return
        cfg = alembic_config(conn)
        if rev is None:
            legacy_to_baseline(conn)
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")


def legacy_to_baseline(conn: sa.Connection) -> None:
    """A store from before Alembic: add what batchprod versions before the baseline added on open
    (the attempt's provenance context column; the context, output and execution tables)."""
    from batchprod.state.migrations import baseline

    cols = {c["name"] for c in sa.inspect(conn).get_columns("attempt")}
    if "context" not in cols:
        conn.exec_driver_sql("ALTER TABLE attempt ADD COLUMN context VARCHAR")
    baseline.metadata.create_all(conn, checkfirst=True)
