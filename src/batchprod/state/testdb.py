"""Databases for tests: a fresh PostgreSQL schema per test on the server named by
``$BATCHPROD_TEST_PG_URL`` (``scripts/dev-postgres.sh url``), dropped afterwards.

Without that server a test asking for it is skipped, or fails when ``$BATCHPROD_REQUIRE_ENGINES=1``
(CI). Stores opened on a schema's URL share one engine per URL, so a test's stores and its
subprocesses (which get the URL through ``$BATCHPROD_DB``) all see the same schema.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

PG_ENV = "BATCHPROD_TEST_PG_URL"


def pg_base_url() -> str | None:
    """The test server's URL, or None (with the reason in :func:`pg_unavailable`)."""
    return os.environ.get(PG_ENV) or None


def pg_unavailable() -> str | None:
    """Why PostgreSQL tests cannot run here (None: they can)."""
    url = pg_base_url()
    if not url:
        return f"no PostgreSQL: ${PG_ENV} is not set (scripts/dev-postgres.sh up; export {PG_ENV}=$(scripts/dev-postgres.sh url))"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        return f"PostgreSQL at ${PG_ENV} unreachable: {str(exc.orig).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


def schema_url(base: str, schema: str) -> str:
    """``base`` with every connection's search_path set to ``schema`` (tables, functions, Alembic's
    version table all live there)."""
    u = sa.engine.make_url(base)
    return u.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@contextmanager
def fresh_schema(base: str | None = None, prefix: str = "t") -> Iterator[str]:
    """A new empty schema on the test server for the duration; yields its URL; dropped after."""
    base = base or pg_base_url()
    assert base, f"${PG_ENV} is not set"
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        yield schema_url(base, schema)
    finally:
        from batchprod.state import store

        url = schema_url(base, schema)
        entry = store._shared.pop(url, None)  # noqa: SLF001 (stores a test never closed)
        if entry is not None:
            entry[0].dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


def use_db(kind: str, monkeypatch: object) -> Iterator[str | None]:
    """For a pytest fixture parametrized over ``sqlite`` (each run its own ``state.db``) and
    ``postgresql`` (one fresh schema as the central database, selected through $BATCHPROD_DB so
    that engines started as subprocesses use it too)."""
    import pytest

    from batchprod.state.database import ENV_DB, select_db

    select_db(None)
    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    if kind == "sqlite":
        mp.delenv(ENV_DB, raising=False)
        yield None
        return
    why = pg_unavailable()
    if why:
        if os.environ.get("BATCHPROD_REQUIRE_ENGINES") == "1":
            pytest.fail(why)
        pytest.skip(why)
    with fresh_schema() as url:
        mp.setenv(ENV_DB, url)
        try:
            yield url
        finally:
            select_db(None)
