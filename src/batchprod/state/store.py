"""The run state store: the source of truth for report, cancel and restart.

One SQLite file per run by default (``SUBMIT_DIR/state.db``, WAL), or one central database for many
runs (a SQLite file or PostgreSQL, ``--db URL``); SQLAlchemy Core, schema kept by Alembic migrations
(``state/migrations``). Every table is keyed by run; a :class:`StateStore` is bound to one run.
Writers hand over whole rows and the store commits them in one transaction per flush: a state change
costs ~µs, never a round trip per job on the hot path (SQLite: the driver's executemany on a kept
connection; PostgreSQL: one ``unnest`` statement per table). Every job state change is appended to
the ``event`` table in that same transaction (by a trigger: no writer can forget it).

A damaged store (not a database, truncated, tables or rows missing, a status no batchprod writes) is
reported as one :class:`DamagedStateError` naming the file, never as a traceback: opening checks the
header, the schema and the run row; the reads check what they return (job count and ids against the
run row, status values) at no extra query.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from batchprod.errors import RunError
from batchprod.execution.capture import sanitize_record
from batchprod.execution.states import JobState, RunState
from batchprod.state.database import parse_url, public_url

#: Alembic revision of the schema below (a test checks it is the head of state/migrations)
SCHEMA_REVISION = "0004"

_md = sa.MetaData()

run_t = sa.Table(
    "run",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("submit_dir", sa.String, nullable=False),
    sa.Column("wms", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("n_jobs", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("orchestrator_pid", sa.Integer),
    sa.Column("orchestrator_host", sa.String),
    sa.Column("orchestrator_start", sa.Float),  # process create time: a reused pid is not our orchestrator
    sa.Column("message", sa.String),
    sa.Index("ix_run_name", "name"),  # output run names repeat across repositories
    sa.Index("uq_run_submit_dir", "submit_dir", unique=True),
)

job_t = sa.Table(
    "job",
    _md,
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("id", sa.Integer, nullable=False),  # index in the generic workflow; final job = n_jobs
    sa.Column("name", sa.String, nullable=False),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("n_quanta", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),  # every attempt ever (survives restart)
    sa.Column("retries", sa.Integer, nullable=False, default=0),  # budget used since submit/restart
    sa.Column("preemptions", sa.Integer, nullable=False, default=0),
    sa.Column("infra_failures", sa.Integer, nullable=False, default=0),
    sa.Column("request_memory", sa.Integer, nullable=False),  # learned: raised after an OOM
    sa.Column("failure_class", sa.String),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.String),
    sa.Column("updated", sa.Float),
    sa.PrimaryKeyConstraint("run_id", "id", name="pk_job"),
    sa.Index("uq_job_run_id_name", "run_id", "name", unique=True),
    sa.Index("ix_job_run_id_status", "run_id", "status"),
    sqlite_with_rowid=False,
)

attempt_t = sa.Table(
    "attempt",
    _md,
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("failure_class", sa.String),
    sa.Column("exit_code", sa.Integer),
    sa.Column("signal", sa.Integer),
    sa.Column("request_memory", sa.Integer),
    sa.Column("peak_rss_mb", sa.Float),
    sa.Column("cpu_s", sa.Float),
    sa.Column("wall_s", sa.Float),
    sa.Column("host", sa.String),
    sa.Column("pid", sa.Integer),
    sa.Column("handle", sa.String),  # backend's id of the attempt: pid, Slurm job id, ...
    sa.Column("start", sa.Float),
    sa.Column("end", sa.Float),
    sa.Column("stdout", sa.String),
    sa.Column("stderr", sa.String),
    sa.Column("message", sa.String),
    sa.Column("error_line", sa.String),  # first causal error line of stderr
    sa.Column("context", sa.String),  # hash of the provenance context it ran in (context table)
    sa.Column("site", sa.String),  # where it ran (revision 0003)
    sa.PrimaryKeyConstraint("run_id", "job_id", "number", name="pk_attempt"),
    sa.ForeignKeyConstraint(["run_id", "job_id"], ["job.run_id", "job.id"], name="fk_attempt_job"),
    sqlite_with_rowid=False,
)

context_t = sa.Table(
    "context",
    _md,
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("hash", sa.String, nullable=False),
    sa.Column("record", sa.Text, nullable=False),  # JSON: host, user, python, packages, environment
    sa.PrimaryKeyConstraint("run_id", "hash", name="pk_context"),
    sqlite_with_rowid=False,
)

execution_t = sa.Table(
    "execution",  # one row per engine session: elapsed time counts these, not the idle gaps between
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float),  # None while it runs, or if the engine died (then: its last write)
    sa.Column("host", sa.String),
    sa.Column("pid", sa.Integer),
    sa.PrimaryKeyConstraint("id", name="pk_execution"),
    sa.Index("ix_execution_run_id", "run_id"),
)

output_t = sa.Table(
    "output",
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("node_id", sa.String, nullable=False),
    sa.Column("dataset_type", sa.String, nullable=False),
    sa.Column("data_id", sa.String, nullable=False),
    sa.Column("path", sa.String, nullable=False),
    sa.Column("size", sa.BigInteger),
    sa.Column("checksum", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_output"),
    sa.ForeignKeyConstraint(["run_id", "job_id"], ["job.run_id", "job.id"], name="fk_output_job"),
    sa.Index("ix_output_run_id_job_id", "run_id", "job_id"),
    sa.Index("ix_output_run_id_path", "run_id", "path"),
    sa.Index("ix_output_run_id_type_data_id", "run_id", "dataset_type", "data_id"),
)

event_t = sa.Table(
    "event",  # append-only: one row per job state change, written with the change (live streams, metrics)
    _md,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
    sa.Column("run_id", sa.Integer, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=False),
    sa.Column("attempt", sa.Integer),  # the job's attempt count at the change
    sa.Column("state", sa.String, nullable=False),  # the job's new status
    sa.Column("message", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_event"),
    sa.Index("ix_event_run_id_id", "run_id", "id"),
)

# -- workload management (revision 0004): campaigns, their steps and runs, sites, operator events -----
_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")

campaign_t = sa.Table(
    "campaign",  # a named, owned, prioritized set of runs in steps
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("owner", sa.String, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("share", sa.Float, nullable=False),  # fair-share target among campaigns of equal priority
    sa.Column("state", sa.String, nullable=False),  # planned running paused done failed cancelled
    sa.Column("spec", sa.Text, nullable=False),  # JSON: the campaign file as validated
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("message", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_campaign"),
    sa.UniqueConstraint("name", name="uq_campaign_name"),
)

step_t = sa.Table(
    "campaign_step",
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("campaign_id", sa.Integer, nullable=False),
    sa.Column("position", sa.Integer, nullable=False),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("state", sa.String, nullable=False),  # waiting gated running done failed cancelled
    sa.Column("released", sa.Float),  # when an operator released its gate
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
    sa.Column("message", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_campaign_step"),
    sa.UniqueConstraint("campaign_id", "name", name="uq_campaign_step_name"),
)

campaign_run_t = sa.Table(
    "campaign_run",  # one submit config of a step: prepared (a run) when its step starts
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("campaign_id", sa.Integer, nullable=False),
    sa.Column("step_id", sa.Integer, nullable=False),
    sa.Column("config", sa.String, nullable=False),
    sa.Column("submit_dir", sa.String),
    sa.Column("state", sa.String, nullable=False),  # planned, a RunState, or failed to prepare
    sa.Column("n_jobs", sa.Integer),
    sa.Column("done", sa.Integer),
    sa.Column("failed", sa.Integer),
    sa.Column("message", sa.String),
    sa.Column("updated", sa.Float),
    sa.PrimaryKeyConstraint("id", name="pk_campaign_run"),
    sa.Index("ix_campaign_run_step", "step_id"),
)

site_state_t = sa.Table(
    "site_state",  # what the dispatcher believes of each site, with the evidence for it
    _md,
    sa.Column("name", sa.String, nullable=False),
    sa.Column("state", sa.String, nullable=False),  # online degraded draining down probing
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("evidence", sa.String),
    sa.Column("stats", sa.Text),  # JSON: running, queued, preempted, failure rate, skips by reason
    sa.Column("updated", sa.Float, nullable=False),
    sa.PrimaryKeyConstraint("name", name="pk_site_state"),
)

ops_event_t = sa.Table(
    "ops_event",  # append-only: every campaign, step, run, site and incident state change
    _md,
    sa.Column("id", _ID, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # campaign step run site incident
    sa.Column("subject", sa.String, nullable=False),
    sa.Column("state", sa.String, nullable=False),
    sa.Column("message", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_ops_event"),
)

incident_t = sa.Table(
    "incident",  # grouped by (kind, signature, campaign): 5,000 identical failures are one incident
    _md,
    sa.Column("id", sa.Integer, nullable=False),
    sa.Column("kind", sa.String, nullable=False),  # job_failed site_down site_degraded step_stuck
    sa.Column("signature", sa.String, nullable=False),
    sa.Column("campaign", sa.String, nullable=False),  # '' when none
    sa.Column("site", sa.String),
    sa.Column("state", sa.String, nullable=False),  # open resolved
    sa.Column("first", sa.Float, nullable=False),
    sa.Column("last", sa.Float, nullable=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("evidence", sa.Text),
    sa.Column("affected", sa.Text),  # JSON: a sample of affected jobs / runs
    sa.Column("delivered", sa.Integer, nullable=False, default=0),  # hook deliveries that succeeded
    sa.Column("hook_error", sa.String),
    sa.PrimaryKeyConstraint("id", name="pk_incident"),
    sa.UniqueConstraint("kind", "signature", "campaign", name="uq_incident_group"),
)

#: the Alembic version table, as Alembic itself creates it (fresh stores are created, then stamped)
version_t = sa.Table(
    "alembic_version",
    _md,
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)

#: job state changes -> event rows, in the writing transaction (same DDL in migration 0002)
EVENT_TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER trg_job_event AFTER UPDATE OF status ON job FOR EACH ROW "
        "WHEN OLD.status IS NOT NEW.status BEGIN "
        "INSERT INTO event (run_id, time, job_id, attempt, state, message) VALUES (NEW.run_id, "
        "COALESCE(NEW.updated, (julianday('now') - 2440587.5) * 86400.0), NEW.id, NEW.attempts, NEW.status, "
        "NEW.message); END",
    ],
    "postgresql": [
        "CREATE FUNCTION batchprod_job_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO event (run_id, time, job_id, attempt, state, message) VALUES (NEW.run_id, "
        "COALESCE(NEW.updated, extract(epoch from clock_timestamp())), NEW.id, NEW.attempts, NEW.status, "
        "NEW.message); RETURN NULL; END $$",
        "CREATE TRIGGER trg_job_event AFTER UPDATE OF status ON job FOR EACH ROW "
        "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION batchprod_job_event()",
    ],
}

JOB_MUTABLE = (
    "status", "attempts", "retries", "preemptions", "infra_failures", "request_memory", "failure_class",
    "exit_code", "message", "updated",
)
#: what writers give of an attempt (the store adds the run)
ATTEMPT_COLUMNS = tuple(c.name for c in attempt_t.columns if c.name != "run_id")
OUTPUT_COLUMNS = tuple(c.name for c in output_t.columns if c.name not in ("id", "run_id"))

STATE_FILE = "state.db"
TABLES = ("run", "job", "attempt", "context", "output", "execution", "event")
CORE_TABLES = ("run", "job", "attempt")
JOB_STATES = frozenset(s.value for s in JobState)
RUN_STATES = frozenset(s.value for s in RunState)
SQLITE_HEADER = 100  # bytes: no SQLite database is shorter


def _unknown_status_query() -> tuple[Any, dict[str, str]]:
    """One job of the run whose status is none of JobState's, if any: a LIMIT 1 index seek into each
    gap between the known values (an ``OR`` of the ranges, or ``NOT IN``, makes SQLite scan the table)."""
    known = sorted(JOB_STATES)
    bounds = [(None, known[0]), *zip(known, known[1:], strict=False), (known[-1], None)]
    parts, params = [], {}
    for i, (lo, hi) in enumerate(bounds):
        cond = ["run_id = :run_id"]
        if lo is not None:
            cond.append(f"status > :lo{i}")
            params[f"lo{i}"] = lo
        if hi is not None:
            cond.append(f"status < :hi{i}")
            params[f"hi{i}"] = hi
        parts.append(f"SELECT * FROM (SELECT name, status FROM job WHERE {' AND '.join(cond)} LIMIT 1) AS u{i}")
    return sa.text(" UNION ALL ".join(parts)), params


class DamagedStateError(RunError):
    """A run's state store is damaged or was tampered with (the message names the file)."""


_UNKNOWN_STATUS, _UNKNOWN_STATUS_PARAMS = _unknown_status_query()


def _reading(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A read of the store: a database error becomes one line naming the file."""

    @functools.wraps(fn)
    def wrapper(self: StateStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except (sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
            raise self._error(exc) from None

    return wrapper


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _new_engine(url: str) -> sa.Engine:
    kwargs: dict[str, Any] = {}
    u = sa.engine.make_url(url)
    if u.get_backend_name() == "postgresql" and "connect_timeout" not in u.query:
        kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable server: one line in 10 s, not minutes
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


# one engine (and connection pool) per central database URL in a process, shared by its stores: a
# dispatcher holds a store per run; disposed when the last of them closes
_shared: dict[str, list[Any]] = {}
_shared_lock = threading.Lock()


def _shared_engine(url: str) -> sa.Engine:
    with _shared_lock:
        entry = _shared.get(url)
        if entry is None:
            entry = _shared[url] = [_new_engine(url), 0]
        entry[1] += 1
        return entry[0]


def _release_engine(url: str) -> None:
    with _shared_lock:
        entry = _shared.get(url)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _shared[url]
            entry[0].dispose()


def _cols(table: sa.Table) -> list[sa.Column[Any]]:
    """A table's columns as readers see them (the run key is the store's business)."""
    return [c for c in table.columns if c.name != "run_id"]


_PG_ARRAY = {sa.Integer: "int4[]", sa.BigInteger: "int8[]", sa.Float: "float8[]", sa.String: "text[]",
             sa.Text: "text[]"}


#: up to this many rows a PostgreSQL write sends plain statements (measured: bench/RESULTS.md)
_PG_FEW = 8


def _pg_array_type(col: sa.Column[Any]) -> str:
    for t in type(col.type).__mro__:
        if t in _PG_ARRAY:
            return _PG_ARRAY[t]
    raise TypeError(f"no array type for {col}")


def _rounds(rows: Sequence[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], Any]) -> list[list[Any]]:
    """Rows split so that no key repeats within a part, in order: one statement cannot change a row
    twice, and a job that went RUNNING then SUCCEEDED within one flush is two changes (two events),
    as on SQLite. Nearly always one part."""
    parts: list[list[Any]] = []
    seen: dict[Any, int] = {}
    for r in rows:
        k = key(r)
        n = seen.get(k, 0)  # the n-th change of this row goes in part n
        seen[k] = n + 1
        if n == len(parts):
            parts.append([])
        parts[n].append(r)
    return parts


class StateStore:
    """Access to one run's state.

    ``StateStore(path)``: the run in a per-run SQLite file (``SUBMIT_DIR/state.db``; the file holds
    one run). ``StateStore(url, run=name)``: run ``name`` of a central database (``sqlite:///...``
    or ``postgresql+psycopg://...``); stores of one URL share one engine. ``create=True`` makes the
    file (or the central schema, if the database has none yet) and binds the store at
    :meth:`init_run`. A database written by an older batchprod is migrated when opened (Alembic); a
    per-run file from before Alembic is recognised as the baseline, stamped, then upgraded.
    """

    def __init__(self, url_or_path: str | Path, create: bool = False, run: str | int | None = None) -> None:
        url = str(url_or_path)
        #: how errors name the store: the file, or the URL without its password
        self.where = url
        #: one database for many runs (a URL), or a per-run file (a path)
        self.central = "://" in url or url.startswith(("sqlite:", "postgresql"))
        self.run_name = run
        self.run_id: int | None = None
        self._file: Path | None = None
        self._pointer_dir: Path | None = None  # where init_run names the central database (prepare)
        if not self.central:
            p = Path(url)
            if not create and not p.is_file():
                raise RunError(f"{p}: no run state store here")
            if not create:
                self._check_header(p)
            self._file = p
            url = f"sqlite:///{p}"
        else:
            u = parse_url(url)
            self.where = public_url(u)
            if u.get_backend_name() == "sqlite":
                p = Path(u.database or "")
                if p.exists() or not create:
                    if not p.is_file():
                        raise RunError(f"{self.where}: no such database file")
                    self._check_header(p)
                self._file = p
        self.url = url
        self._stmts: dict[Any, Any] = {}
        self._raw: Any = None
        self._sql: dict[str, Any] = {}
        self.engine = _shared_engine(url) if self.central else _new_engine(url)
        self.dialect = self.engine.dialect.name
        try:
            from batchprod.state import migrate

            if self._file is not None and self._file.exists():
                self._check_size(self._file)  # first: a file cut short fails anywhere after
            migrate.ensure_schema(self, create)
            if create or (self.central and run is None):
                return  # bound at init_run, or a central database's listing (runs())
            self._bind(run)
            n_jobs = self.run_info()["n_jobs"]  # the run row makes sense
            self._check_job_rows(n_jobs)
        except (sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
            self._dispose()
            raise self._error(exc) from None
        except BaseException:
            self._dispose()
            raise

    def _bind(self, run: str | int | None) -> None:
        """Bind the store to its run: by id, by name (which must be unique), or the only one of a
        per-run file."""
        with self.engine.connect() as conn:
            if run is not None:
                col = run_t.c.id if isinstance(run, int) else run_t.c.name
                ids = conn.execute(sa.select(run_t.c.id).where(col == run).limit(2)).scalars().all()
                if not ids:
                    raise RunError(f"{self.where}: no run {run!r} in this database")
                if len(ids) > 1:
                    raise RunError(f"{self.where}: several runs are named {run!r}: give the submit directory")
            else:
                ids = conn.execute(sa.select(run_t.c.id).limit(2)).scalars().all()
                if not ids:
                    raise self._damaged("no run row")
                if len(ids) > 1:
                    raise RunError(f"{self.where}: this database holds many runs: name one (run=...)")
        rid = ids[0]
        if not isinstance(rid, int):
            raise self._damaged(f"run row: bad id {rid!r}")
        self.run_id = rid

    # -- damage -------------------------------------------------------------------------------------
    def _check_header(self, p: Path) -> None:
        """Refuse a file too short to be SQLite before SQLite touches it (it would turn an empty file
        into a fresh database). Other garbage SQLite refuses itself without writing to it. The file
        is only stat'ed, never opened here: closing a descriptor of a database file would drop the
        locks this process's connections hold on it."""
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise RunError(f"{p}: cannot read run state: {exc.strerror}") from None
        if size < SQLITE_HEADER:
            raise DamagedStateError(f"{p}: damaged run state: " + ("empty file" if not size else
                                                                    f"truncated ({size} bytes)"))

    def _check_job_rows(self, n: int) -> None:
        """Every job row there (ids 0..n-1: unique integers, so the count and both ends say it all)
        and no status batchprod does not write, found by index seeks into the gaps between the known
        statuses: ~1 ms at 10^6 jobs, so every open can afford it."""
        mine = job_t.c.run_id == self.run_id
        with self.engine.connect() as conn:
            count, lo, hi = conn.execute(
                sa.select(sa.func.count(), sa.func.min(job_t.c.id), sa.func.max(job_t.c.id)).where(mine)).one()
            if count != n or (n and (lo != 0 or hi != n - 1)):
                raise self._wrong_job_count(count)
            bad = conn.execute(_UNKNOWN_STATUS, {**_UNKNOWN_STATUS_PARAMS, "run_id": self.run_id}).first()
        if bad is not None:
            raise self._damaged(f"job '{bad[0]}' has unknown status {bad[1]!r}")

    def _check_size(self, p: Path) -> None:
        """A file cut short: SQLite reads only the pages it needs, so a truncated store may open and
        answer some queries; its header says how long it is. While the WAL holds frames the main
        file may legitimately be shorter (a live run), so the check is made only when it does not.
        Page count first, then the WAL, then the file: a checkpoint in between only grows the file."""
        with self.engine.connect() as conn:
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
            page_size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
        try:
            wal = p.with_name(p.name + "-wal").stat().st_size
        except OSError:
            wal = 0
        try:
            size = p.stat().st_size
        except OSError as exc:
            raise RunError(f"{p}: cannot read run state: {exc.strerror}") from None
        if not wal and size < pages * page_size:
            raise self._damaged(f"truncated ({size} of {pages * page_size} bytes)")

    @staticmethod
    def _diagnose(p: Path) -> str | None:
        """What is wrong with a file SQLite calls malformed (it may have read pages from a WAL that
        outlived the file): not SQLite's header, or cut short by the header's own page count? Read
        only once SQLite has refused the file: closing a descriptor of it drops this process's locks."""
        try:
            with open(p, "rb") as fh:
                head = fh.read(SQLITE_HEADER)
            size = p.stat().st_size
            wal = p.with_name(p.name + "-wal")
            wal_frames = wal.exists() and wal.stat().st_size > 0
        except OSError:
            return None
        if head[:16] != b"SQLite format 3\x00":  # what SQLite says when it reads the header first
            return "file is not a database"
        page_size = int.from_bytes(head[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(head[28:32], "big")
        valid = head[24:28] == head[92:96]  # the page count is kept only when these agree
        if valid and pages and size < pages * page_size and not wal_frames:
            return f"truncated ({size} of {pages * page_size} bytes)"
        return None

    def _damaged(self, what: str) -> DamagedStateError:
        return DamagedStateError(f"{self.where}: damaged run state: {what}")

    def _error(self, exc: BaseException) -> RunError:
        import re

        orig = getattr(exc, "orig", None) or exc
        msg = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        if "locked" in msg or "unable to open" in msg or "readonly" in msg:
            return RunError(f"{self.where}: cannot read run state: {msg}")  # not damage: say so
        if self.central and isinstance(exc, sa.exc.OperationalError) and self.dialect != "sqlite":
            return RunError(f"{self.where}: database error: {msg}")  # unreachable, refused, ...: not damage
        if "malformed" in msg and self._file is not None:
            cut = self._diagnose(self._file)
            if cut:
                return self._damaged(cut)
        m = re.match(r'(?:no such table: |relation ")(\w+)', msg)
        if m:
            return self._damaged(f"no '{m.group(1)}' table")
        return self._damaged(msg)

    def _unknown_status(self, status: Any) -> DamagedStateError:
        with self.engine.connect() as conn:
            name = conn.execute(sa.select(job_t.c.name).where(job_t.c.run_id == self.run_id,
                                                               job_t.c.status == status).limit(1)).scalar()
        return self._damaged(f"job '{name}' has unknown status {status!r}")

    def _wrong_job_count(self, found: int) -> DamagedStateError:
        """The job rows do not match the run row: name the first missing (or extra) job id."""
        n = self.run_info()["n_jobs"]
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(job_t.c.id).where(job_t.c.run_id == self.run_id)
                                              .order_by(job_t.c.id))]
        extra = [i for i in ids if not (isinstance(i, int) and 0 <= i < n)]
        if extra:
            return self._damaged(f"job row with id {extra[0]!r} beyond the run's {n} jobs")
        missing = next((i for i, have in enumerate(ids) if i != have), len(ids))
        return self._damaged(f"job {missing} of {n} is missing ({n - len(ids)} job rows deleted?)")

    def _check_jobs(self, rows: Sequence[Any], id_col: int | None, status_col: int | None) -> None:
        """Every job of the run, with ids 0..n-1 and known statuses (O(1) for the ids: they are unique
        and sorted, so the count and both ends say it all; one set for the statuses)."""
        n = self.run_info()["n_jobs"]
        if len(rows) != n or (id_col is not None and n and (rows[0][id_col] != 0 or rows[-1][id_col] != n - 1)):
            raise self._wrong_job_count(len(rows))
        if status_col is not None:
            bad = {r[status_col] for r in rows} - JOB_STATES
            if bad:
                raise self._unknown_status(min(bad, key=str))

    def _dispose(self) -> None:
        if self._raw is not None:
            with contextlib.suppress(Exception):  # closing after a failure: the first error is the one to tell
                self._raw.close()
            self._raw = None
        if self.engine is None:
            return
        if self.central:
            _release_engine(self.url)
        else:
            self.engine.dispose()
        self.engine = None  # type: ignore[assignment]

    def close(self) -> None:
        self._dispose()

    # -- creation -----------------------------------------------------------------------------------
    def init_run(self, name: str, submit_dir: str, wms: str, jobs: Iterable[Mapping[str, Any]]) -> int:
        """Create the run row and every job row (PENDING) in one transaction, and bind the store to it.
        In a central database a run is its submit directory (output run names repeat across
        repositories); the row of an earlier run whose submit directory is gone (deleted, or a
        prepare that never completed) is replaced."""
        now = time.time()
        cols = ("run_id", "id", "name", "label", "n_quanta", "priority", "status", "attempts", "retries",
                "preemptions", "infra_failures", "request_memory", "updated")
        with self.engine.begin() as conn:
            if not self.central:
                if conn.execute(sa.select(sa.func.count()).select_from(run_t)).scalar():
                    raise RunError(f"{self.where}: run already initialised")
                rid = 1
                conn.execute(run_t.insert().values(id=rid, name=name, submit_dir=submit_dir, wms=wms,
                                                   status="PREPARED", n_jobs=0, created=now, updated=now))
            else:
                self._drop_gone(conn, submit_dir)
                rid = conn.execute(run_t.insert().values(name=name, submit_dir=submit_dir, wms=wms,
                                                         status="PREPARED", n_jobs=0, created=now, updated=now)
                                   ).inserted_primary_key[0]
            rows = [(rid, j["id"], j["name"], j["label"], j["n_quanta"], j["priority"], "PENDING", 0, 0, 0, 0,
                     j["request_memory"], now) for j in jobs]
            if self.dialect == "sqlite":
                # the driver's executemany over tuples: ~10x faster than Core's per-dict processing,
                # which matters at 10^6 jobs
                sql = f"INSERT INTO job ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                conn.exec_driver_sql(sql, rows)
            else:  # COPY: PostgreSQL's bulk path
                cur = conn.connection.driver_connection.cursor()
                with cur.copy(f"COPY job ({', '.join(cols)}) FROM STDIN") as cp:
                    for r in rows:
                        cp.write_row(r)
            conn.execute(run_t.update().where(run_t.c.id == rid).values(n_jobs=len(rows)))
        self.run_id = int(rid)
        self.run_name = name
        if self._pointer_dir is not None:
            from batchprod.state.database import write_pointer

            write_pointer(self._pointer_dir, self.url, name, self.run_id)
        return len(rows)

    def _drop_gone(self, conn: Any, submit_dir: str) -> None:
        old = conn.execute(sa.select(run_t.c.id, run_t.c.name).where(run_t.c.submit_dir == submit_dir)).first()
        if old is None:
            return
        if Path(submit_dir).exists():
            raise RunError(f"{self.where}: run '{old.name}' of {submit_dir} is already recorded here")
        self._delete_run(conn, old.id)

    def delete_run(self) -> None:
        """Forget this run: every row of it, in one transaction (its submit directory is not touched)."""
        with self.engine.begin() as conn:
            self._delete_run(conn, self.run_id)
        self.run_id = None

    @staticmethod
    def _delete_run(conn: Any, rid: int) -> None:
        for t in (event_t, output_t, attempt_t, context_t, execution_t, job_t):
            conn.execute(t.delete().where(t.c.run_id == rid))
        conn.execute(run_t.delete().where(run_t.c.id == rid))

    # -- run row ------------------------------------------------------------------------------------
    @_reading
    def run_info(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(run_t).where(run_t.c.id == self.run_id)).mappings().first()
        if row is None:
            raise self._damaged("no run row")
        info = dict(row)
        if info["status"] not in RUN_STATES:
            raise self._damaged(f"unknown run status {info['status']!r}")
        for key, types in (("name", str), ("submit_dir", str), ("wms", str), ("n_jobs", int),
                           ("created", (int, float)), ("updated", (int, float))):
            if not isinstance(info[key], types) or isinstance(info[key], bool):
                raise self._damaged(f"run row: bad {key} {info[key]!r}")
        return info

    def set_run(self, **fields: Any) -> None:
        fields["updated"] = time.time()
        with self.engine.begin() as conn:
            conn.execute(run_t.update().where(run_t.c.id == self.run_id).values(**fields))

    # -- batched writes -----------------------------------------------------------------------------
    def write(
        self,
        jobs: Sequence[Mapping[str, Any]] = (),
        attempts: Sequence[Mapping[str, Any]] = (),
        outputs: Sequence[Mapping[str, Any]] = (),
        contexts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Commit job rows (id + JOB_MUTABLE), attempt rows (upsert), outputs and new provenance
        contexts (hash -> record; known ones are kept) in one transaction, with one event row per job
        whose status changed."""
        if not (jobs or attempts or outputs or contexts):
            return
        # sanitized here too: a record from a remote wrapper of another version never stores a secret
        ctx_rows = [(h, json.dumps(sanitize_record(r), sort_keys=True)) for h, r in (contexts or {}).items()]
        if self.dialect == "sqlite":
            self._write_sqlite(jobs, attempts, outputs, ctx_rows)
        else:
            self._write_pg(jobs, attempts, outputs, ctx_rows)

    def _write_sqlite(
        self,
        jobs: Sequence[Mapping[str, Any]],
        attempts: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
        contexts: Sequence[tuple[str, str]] = (),
    ) -> None:
        """The hot path on SQLite: the driver's executemany, on one kept connection for a per-run file
        (a pooled one for a central file). SQLAlchemy Core costs ~0.7 ms per flush here, the driver
        ~0.1 ms, and the orchestrator flushes before every launch batch."""
        if not self._sql:
            acols = [c for c in ATTEMPT_COLUMNS if c not in ("job_id", "number")]
            self._sql = {
                "job": f"UPDATE job SET {', '.join(f'{c}=?' for c in JOB_MUTABLE)} WHERE run_id=? AND id=?",
                "attempt": f"INSERT INTO attempt (run_id, {', '.join(ATTEMPT_COLUMNS)}) VALUES "
                f"(?, {', '.join('?' * len(ATTEMPT_COLUMNS))}) ON CONFLICT(run_id, job_id, number) DO UPDATE SET "
                + ", ".join(f"{c}=excluded.{c}" for c in acols),
                "output": f"INSERT INTO output (run_id, {', '.join(OUTPUT_COLUMNS)}) VALUES "
                f"(?, {', '.join('?' * len(OUTPUT_COLUMNS))})",
                "context": "INSERT OR IGNORE INTO context (run_id, hash, record) VALUES (?, ?, ?)",
            }
        if self.central:
            raw = self.engine.raw_connection()
        else:
            if self._raw is None:
                self._raw = self.engine.raw_connection()
            raw = self._raw
        sql, rid = self._sql, self.run_id
        cur = raw.cursor()
        try:
            if jobs:
                cur.executemany(sql["job"], [tuple(j.get(c) for c in JOB_MUTABLE) + (rid, j["id"]) for j in jobs])
            if attempts:
                cur.executemany(sql["attempt"], [(rid, *(a.get(c) for c in ATTEMPT_COLUMNS)) for a in attempts])
            if outputs:
                cur.executemany(sql["output"], [(rid, *(o.get(c) for c in OUTPUT_COLUMNS)) for o in outputs])
            if contexts:
                cur.executemany(sql["context"], [(rid, h, r) for h, r in contexts])
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cur.close()
            if self.central:
                raw.close()

    def _pg_sql(self) -> dict[str, str]:
        """PostgreSQL writes: one statement per table for any number of rows, the rows passed as one
        array per column and turned back into rows by ``unnest`` (a round trip per table and flush,
        not per row)."""
        if self._sql:
            return self._sql

        q = self.engine.dialect.identifier_preparer.quote  # "end" is a reserved word there

        def names(cols: Sequence[str]) -> str:
            return ", ".join(q(c) for c in cols)

        def unnest(table: sa.Table, cols: Sequence[str]) -> str:
            return ("unnest(" + ", ".join(f"%s::{_pg_array_type(table.c[c])}" for c in cols)
                    + f") AS u({names(cols)})")

        jcols = ("id", *JOB_MUTABLE)
        acols = [c for c in ATTEMPT_COLUMNS if c not in ("job_id", "number")]
        self._sql = {
            "job": f"UPDATE job AS j SET {', '.join(f'{q(c)} = u.{q(c)}' for c in JOB_MUTABLE)} "
                   f"FROM {unnest(job_t, jcols)} WHERE j.run_id = %s AND j.id = u.id",
            "attempt": f"INSERT INTO attempt (run_id, {names(ATTEMPT_COLUMNS)}) "
                       f"SELECT %s::int4, u.* FROM {unnest(attempt_t, ATTEMPT_COLUMNS)} "
                       f"ON CONFLICT (run_id, job_id, number) DO UPDATE SET "
                       + ", ".join(f"{q(c)} = excluded.{q(c)}" for c in acols),
            "output": f"INSERT INTO output (run_id, {names(OUTPUT_COLUMNS)}) "
                      f"SELECT %s::int4, u.* FROM {unnest(output_t, OUTPUT_COLUMNS)}",
            "context": f"INSERT INTO context (run_id, hash, record) SELECT %s::int4, u.* FROM "
                       f"{unnest(context_t, ('hash', 'record'))} ON CONFLICT (run_id, hash) DO NOTHING",
            # a few rows: one plain statement each, pipelined by executemany (cheaper below ~8 rows)
            "job_rows": f"UPDATE job SET {', '.join(f'{q(c)} = %s' for c in JOB_MUTABLE)} "
                        "WHERE run_id = %s AND id = %s",
            "attempt_rows": f"INSERT INTO attempt (run_id, {names(ATTEMPT_COLUMNS)}) VALUES "
                            f"(%s, {', '.join(['%s'] * len(ATTEMPT_COLUMNS))}) "
                            f"ON CONFLICT (run_id, job_id, number) DO UPDATE SET "
                            + ", ".join(f"{q(c)} = excluded.{q(c)}" for c in acols),
        }
        return self._sql

    def _write_pg(
        self,
        jobs: Sequence[Mapping[str, Any]],
        attempts: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
        contexts: Sequence[tuple[str, str]] = (),
    ) -> None:
        """The hot path on PostgreSQL: one ``unnest`` statement per table (a few rows: executemany),
        one commit."""
        sql, rid = self._pg_sql(), self.run_id

        def columns(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> list[list[Any]]:
            return [[r.get(c) for r in rows] for c in cols]

        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            if contexts:
                cur.execute(sql["context"], (rid, [h for h, _ in contexts], [r for _, r in contexts]))
            if len(jobs) <= _PG_FEW:  # in order, so a job changed twice is two changes
                cur.executemany(sql["job_rows"], [(*(j.get(c) for c in JOB_MUTABLE), rid, j["id"]) for j in jobs])
            else:
                for part in _rounds(jobs, lambda j: j["id"]):
                    cur.execute(sql["job"], (*columns(part, ("id", *JOB_MUTABLE)), rid))
            if len(attempts) <= _PG_FEW:
                cur.executemany(sql["attempt_rows"], [(rid, *(a.get(c) for c in ATTEMPT_COLUMNS)) for a in attempts])
            else:
                for part in _rounds(attempts, lambda a: (a["job_id"], a["number"])):
                    cur.execute(sql["attempt"], (rid, *columns(part, ATTEMPT_COLUMNS)))
            if outputs:
                cur.execute(sql["output"], (rid, *columns(outputs, OUTPUT_COLUMNS)))
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            raw.close()

    # -- reads --------------------------------------------------------------------------------------
    @_reading
    def jobs(self, status: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = sa.select(*_cols(job_t)).where(job_t.c.run_id == self.run_id).order_by(job_t.c.id)
        if isinstance(status, str):
            q = q.where(job_t.c.status == status)
        elif status is not None:
            q = q.where(job_t.c.status.in_(list(status)))
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
        if status is None:
            self._check_jobs([(r["id"], r["status"]) for r in rows], 0, 1)
        return rows

    @_reading
    def job_by_name(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(*_cols(job_t)).where(job_t.c.run_id == self.run_id, job_t.c.name == name)
                             ).mappings().first()
        if r is not None and r["status"] not in JOB_STATES:
            raise self._damaged(f"job '{name}' has unknown status {r['status']!r}")
        return dict(r) if r else None

    @_reading
    def job_columns(self, *cols: str) -> list[tuple[Any, ...]]:
        """Selected columns of every job, ordered by id (cheap bulk read for restart); every job of
        the run is there, with a known status."""
        q = sa.select(*[job_t.c[c] for c in cols]).where(job_t.c.run_id == self.run_id).order_by(job_t.c.id)
        with self.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(q)]
        self._check_jobs(rows, cols.index("id") if "id" in cols else None,
                         cols.index("status") if "status" in cols else None)
        return rows

    @_reading
    def attempts(self, job_id: int | None = None, status: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = (sa.select(*_cols(attempt_t)).where(attempt_t.c.run_id == self.run_id)
             .order_by(attempt_t.c.job_id, attempt_t.c.number))
        if job_id is not None:
            q = q.where(attempt_t.c.job_id == job_id)
        if isinstance(status, str):
            q = q.where(attempt_t.c.status == status)
        elif status is not None:
            q = q.where(attempt_t.c.status.in_(list(status)))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def last_attempts(self, status: str | Sequence[str]) -> list[dict[str, Any]]:
        """Jobs in the given state(s) joined with their last attempt (one query, for failure reports)."""
        statuses = [status] if isinstance(status, str) else list(status)
        j, a = job_t, attempt_t
        q = (
            sa.select(j.c.id, j.c.name, j.c.label, j.c.status, j.c.attempts, j.c.failure_class, j.c.exit_code,
                      j.c.message, j.c.request_memory, a.c.signal, a.c.error_line, a.c.stderr, a.c.stdout,
                      a.c.peak_rss_mb, a.c.host)
            .select_from(j.outerjoin(a, sa.and_(a.c.run_id == j.c.run_id, a.c.job_id == j.c.id,
                                                a.c.number == j.c.attempts)))
            .where(j.c.run_id == self.run_id, j.c.status.in_(statuses))
            .order_by(j.c.id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def contexts(self, hashes: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Provenance context records by hash."""
        wanted = sorted({h for h in hashes if h})
        if not wanted:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(context_t.c.hash, context_t.c.record)
                                .where(context_t.c.run_id == self.run_id, context_t.c.hash.in_(wanted))).all()
        out = {}
        for h, r in rows:
            try:
                rec = json.loads(r)
            except (TypeError, ValueError):
                rec = None
            if not isinstance(rec, dict):
                raise self._damaged(f"context {h}: not a JSON object")
            out[h] = sanitize_record(rec)  # older runs kept more values
        return out

    @_reading
    def find_outputs(self, path: str | None = None, dataset_type: str | None = None,
                     data_id: str | None = None) -> list[dict[str, Any]]:
        """Output rows by published path, or by dataset type (and canonical data ID JSON)."""
        q = sa.select(*_cols(output_t)).where(output_t.c.run_id == self.run_id).order_by(output_t.c.id)
        if path is not None:
            q = q.where(output_t.c.path == path)
        if dataset_type is not None:
            q = q.where(output_t.c.dataset_type == dataset_type)
        if data_id is not None:
            q = q.where(output_t.c.data_id == data_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def outputs_by_path(self, paths: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Output rows for many published paths in a few queries (lineage walks)."""
        wanted = sorted(set(paths))
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                q = sa.select(*_cols(output_t)).where(output_t.c.run_id == self.run_id,
                                                      output_t.c.path.in_(wanted[i : i + 500]))
                out.update({r["path"]: dict(r) for r in conn.execute(q).mappings()})
        return out

    @_reading
    def begin_execution(self, host: str, pid: int) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(execution_t.insert().values(run_id=self.run_id, start=time.time(), host=host,
                                                                pid=pid)).inserted_primary_key[0])

    def end_execution(self, execution_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(execution_t.update().where(execution_t.c.run_id == self.run_id,
                                                    execution_t.c.id == execution_id).values(end=time.time()))

    @_reading
    def executions(self) -> list[dict[str, Any]]:
        """Engine sessions, oldest first; an unfinished one ends at the run's last job write."""
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.select(*_cols(execution_t))
                                                  .where(execution_t.c.run_id == self.run_id)
                                                  .order_by(execution_t.c.id)).mappings()]
            if rows and rows[-1]["end"] is None:
                rows[-1]["last_write"] = conn.execute(sa.select(sa.func.max(job_t.c.updated))
                                                      .where(job_t.c.run_id == self.run_id)).scalar()
        return rows

    def drop_outputs(self, job_id: int) -> None:
        """Forget a job's recorded outputs (its next success records them anew: the final job re-runs)."""
        with self.engine.begin() as conn:
            conn.execute(output_t.delete().where(output_t.c.run_id == self.run_id, output_t.c.job_id == job_id))

    def output_columns(self, *cols: str) -> list[tuple[Any, ...]]:
        """Selected columns of every output row (bulk read for ingest)."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(*[output_t.c[c] for c in cols])
                                                   .where(output_t.c.run_id == self.run_id)
                                                   .order_by(output_t.c.id))]

    @_reading
    def outputs(self, job_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(*_cols(output_t)).where(output_t.c.run_id == self.run_id).order_by(output_t.c.id)
        if job_id is not None:
            q = q.where(output_t.c.job_id == job_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def events(self, since_id: int = 0, limit: int | None = 1000) -> list[dict[str, Any]]:
        """The run's job state changes after event ``since_id``, oldest first: id, time, job_id, job
        (name), attempt, state, message. Poll with the last id seen to follow a run live."""
        e, j = event_t, job_t
        q = (sa.select(e.c.id, e.c.time, e.c.job_id, j.c.name.label("job"), e.c.attempt, e.c.state, e.c.message)
             .select_from(e.outerjoin(j, sa.and_(j.c.run_id == e.c.run_id, j.c.id == e.c.job_id)))
             .where(e.c.run_id == self.run_id, e.c.id > since_id).order_by(e.c.id))
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def counts_by_label(self) -> list[tuple[str, str, int, int]]:
        """(label, status, jobs, quanta) grouped in SQL: a report never loads every job. The groups
        say whether a job row is missing or has an unknown status, for free."""
        q = (
            sa.select(job_t.c.label, job_t.c.status, sa.func.count(), sa.func.sum(job_t.c.n_quanta))
            .where(job_t.c.run_id == self.run_id)
            .group_by(job_t.c.label, job_t.c.status)
            .order_by(sa.func.min(job_t.c.id))
        )
        with self.engine.connect() as conn:
            rows = [(lab, st, int(n), int(nq or 0)) for lab, st, n, nq in conn.execute(q)]
        bad = [st for _, st, _, _ in rows if st not in JOB_STATES]
        if bad:
            raise self._unknown_status(min(bad, key=str))
        total = sum(n for _, _, n, _ in rows)
        if total != self.run_info()["n_jobs"]:
            raise self._wrong_job_count(total)
        return rows

    @_reading
    def runs(self) -> list[dict[str, Any]]:
        """Every run of the database (id, name, submit_dir, status, created), newest first."""
        q = sa.select(run_t.c.id, run_t.c.name, run_t.c.submit_dir, run_t.c.status, run_t.c.created)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(run_t.c.created.desc(), run_t.c.id.desc())).mappings()]


def list_central_runs(url: str) -> list[dict[str, Any]]:
    """id, name, submit_dir, status and created of every run in a central database, newest first."""
    store = StateStore(url)
    try:
        return store.runs()
    finally:
        store.close()


def create_store(directory: Path, name: str) -> StateStore:
    """A new run's store, for prepare: ``directory/state.db``, or the central database selected by
    ``--db`` / ``$BATCHPROD_DB`` (then ``directory`` gets the file naming it, without its password)."""
    from batchprod.state.database import selected_db

    url = selected_db()
    if not url:
        return StateStore(directory / STATE_FILE, create=True)
    parse_url(url)  # a URL, never a path: "--db nonsense" is refused, not made a file
    store = StateStore(url, create=True)
    store._pointer_dir = directory  # init_run names the database and the run there
    return store
