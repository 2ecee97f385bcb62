"""Which database holds a run's state: the run's own ``state.db`` (the embedded default) or one central
database for many runs, selected by ``--db URL`` / ``$BATCHPROD_DB`` (a SQLite file URL or
``postgresql+psycopg://...``).

A run kept in a central database has a small file in its submit directory, ``state-db.json``, naming
the database and the run, never a password: batchprod writes no password anywhere. To open such a
run the URL (with its password, if the server wants one) comes again from ``--db`` or
``$BATCHPROD_DB``; without it a SQLite database is opened from the recorded URL, a server database
is refused with one line saying what to give.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from batchprod.errors import RunError

#: the submit directory's pointer to the central database holding the run
DB_FILE = "state-db.json"
ENV_DB = "BATCHPROD_DB"

_selected: str | None = None


def select_db(url: str | None) -> None:
    """Select the central database for this process (the CLI's ``--db``); None: ``$BATCHPROD_DB``."""
    global _selected
    _selected = url or None


@contextlib.contextmanager
def using_db(url: str | None) -> Iterator[None]:
    """Select ``url`` for the duration (a campaign dispatcher preparing runs into its database), then
    restore what was selected before."""
    global _selected
    before = _selected
    _selected = url or None
    try:
        yield
    finally:
        _selected = before


def selected_db() -> str | None:
    """The central database selected by ``--db`` or ``$BATCHPROD_DB``, or None (per-run files)."""
    return _selected or os.environ.get(ENV_DB) or None


def parse_url(url: str) -> sa.engine.URL:
    """A database URL, or one line naming it (without its password) and saying what is wrong."""
    try:
        u = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        raise RunError(f"{redact(url)}: not a database URL (expected sqlite:///PATH or "
                       "postgresql+psycopg://USER@HOST:PORT/DB) from --db / $BATCHPROD_DB") from None
    if u.get_backend_name() not in ("sqlite", "postgresql"):
        raise RunError(f"{public_url(u)}: unsupported database '{u.get_backend_name()}' "
                       "(SQLite or PostgreSQL) from --db / $BATCHPROD_DB")
    if u.get_backend_name() == "sqlite" and not u.database:
        raise RunError(f"{public_url(u)}: an in-memory SQLite database cannot hold runs; give sqlite:///PATH")
    return u


def public_url(url: str | sa.engine.URL) -> str:
    """The URL without any password (in the userinfo or the query): safe to print and to write."""
    u = url if isinstance(url, sa.engine.URL) else sa.engine.make_url(url)
    query = {k: v for k, v in u.query.items() if "pass" not in k.lower()}
    # URL.set(password=None) would keep it (None means "unchanged" there)
    return u._replace(password=None).set(query=query).render_as_string(hide_password=False)


def redact(url: str) -> str:
    """Best effort for a string that is not even a URL: ``user:secret@`` becomes ``user:***@``."""
    import re

    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def same_database(a: sa.engine.URL, b: sa.engine.URL) -> bool:
    """Two URLs naming the same database (password and driver options aside)."""
    def key(u: sa.engine.URL) -> tuple[Any, ...]:
        db = u.database
        if u.get_backend_name() == "sqlite" and db:
            db = str(Path(db).resolve())
        return (u.get_backend_name(), u.username, u.host, u.port, db)

    return key(a) == key(b)


def write_pointer(submit_dir: Path, url: str, run: str, run_id: int) -> None:
    """Name the database (never its password) and the run in the submit directory."""
    data = {"url": public_url(url), "run": run, "run_id": run_id}
    (submit_dir / DB_FILE).write_text(json.dumps(data, indent=1) + "\n")


def read_pointer(submit_dir: Path) -> tuple[str, str, int]:
    """(URL to open, run name, run id) of a run kept in a central database: the URL from --db / $BATCHPROD_DB
    when it names the recorded database, else the recorded one (SQLite only: a server may want a
    password, which batchprod never stores)."""
    path = submit_dir / DB_FILE
    try:
        data = json.loads(path.read_text())
        recorded, run, run_id = str(data["url"]), str(data["run"]), data["run_id"]
        if not isinstance(run_id, int):
            raise TypeError(f"run_id {run_id!r}")
        rec = sa.engine.make_url(recorded)
    except (OSError, ValueError, KeyError, TypeError, sa.exc.ArgumentError) as exc:
        raise RunError(f"{path}: damaged run file: {exc}") from None
    given = selected_db()
    if given:
        g = parse_url(given)
        if not same_database(g, rec):
            raise RunError(f"run '{run}' ({submit_dir}) is kept in {recorded}, not in {public_url(g)} "
                           "(--db / $BATCHPROD_DB)")
        return given, run, run_id
    if rec.get_backend_name() == "sqlite":
        return recorded, run, run_id
    raise RunError(f"run '{run}' ({submit_dir}) is kept in {recorded}: give its URL with --db or "
                   f"${ENV_DB} (batchprod never stores a password)")
