"""The run state store: the source of truth for report, cancel and restart.

One SQLite file per run (WAL, SQLAlchemy Core, so PostgreSQL can serve the campaign service).
Writers hand over whole rows and the store commits them in one transaction per flush: a state change
costs ~µs, never a round trip per job on the hot path.

A damaged store (not a database, truncated, tables or rows missing, a status no batchprod writes) is
reported as one :class:`DamagedStateError` naming the file, never as a traceback: opening checks the
header, the schema and the run row; the reads check what they return (job count and ids against the
run row, status values) at no extra query.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from batchprod.errors import RunError
from batchprod.execution.capture import sanitize_record
from batchprod.execution.states import JobState, RunState

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
)

job_t = sa.Table(
    "job",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),  # = index in the generic workflow; final job = n_jobs
    sa.Column("name", sa.String, nullable=False, unique=True),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("n_quanta", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),  # every attempt ever (survives restart)
    sa.Column("retries", sa.Integer, nullable=False, default=0),  # budget used since submit/restart
    sa.Column("preemptions", sa.Integer, nullable=False, default=0),
    sa.Column("infra_failures", sa.Integer, nullable=False, default=0),
    sa.Column("request_memory", sa.Integer, nullable=False),  # learned: raised after an OOM
    sa.Column("failure_class", sa.String),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.String),
    sa.Column("updated", sa.Float),
)

attempt_t = sa.Table(
    "attempt",
    _md,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
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
)

context_t = sa.Table(
    "context",
    _md,
    sa.Column("hash", sa.String, primary_key=True),
    sa.Column("record", sa.Text, nullable=False),  # JSON: host, user, python, packages, environment
)

execution_t = sa.Table(
    "execution",  # one row per engine session: elapsed time counts these, not the idle gaps between
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float),  # None while it runs, or if the engine died (then: its last write)
    sa.Column("host", sa.String),
    sa.Column("pid", sa.Integer),
)

output_t = sa.Table(
    "output",
    _md,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False, index=True),
    sa.Column("node_id", sa.String, nullable=False),
    sa.Column("dataset_type", sa.String, nullable=False),
    sa.Column("data_id", sa.String, nullable=False),
    sa.Column("path", sa.String, nullable=False, index=True),
    sa.Column("size", sa.BigInteger),
    sa.Column("checksum", sa.String),
    sa.Index("ix_output_type_data_id", "dataset_type", "data_id"),
)

JOB_MUTABLE = (
    "status", "attempts", "retries", "preemptions", "infra_failures", "request_memory", "failure_class",
    "exit_code", "message", "updated",
)
ATTEMPT_COLUMNS = tuple(c.name for c in attempt_t.columns)

STATE_FILE = "state.db"
TABLES = ("run", "job", "attempt", "context", "output", "execution")
JOB_STATES = frozenset(s.value for s in JobState)
RUN_STATES = frozenset(s.value for s in RunState)
SQLITE_HEADER = 100  # bytes: no SQLite database is shorter


def _unknown_status_query() -> tuple[Any, dict[str, str]]:
    """One job whose status is none of JobState's, if any: a LIMIT 1 index seek into each gap
    between the known values (an ``OR`` of the ranges, or ``NOT IN``, makes SQLite scan the table)."""
    known = sorted(JOB_STATES)
    bounds = [(None, known[0]), *zip(known, known[1:], strict=False), (known[-1], None)]
    parts, params = [], {}
    for i, (lo, hi) in enumerate(bounds):
        cond = []
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


class StateStore:
    """Access to one run's state database."""

    def __init__(self, url_or_path: str | Path, create: bool = False) -> None:
        url = str(url_or_path)
        #: how errors name the store: the file, or the URL without its password
        self.where = url
        if "://" not in url:
            p = Path(url)
            if not create and not p.is_file():
                raise RunError(f"{p}: no run state store here")
            if not create:
                self._check_header(p)
            url = f"sqlite:///{p}"
        else:
            self.where = sa.engine.make_url(url).render_as_string(hide_password=True)
        self.url = url
        self._stmts: dict[Any, Any] = {}
        self._raw: Any = None
        self._sql: dict[str, Any] = {}
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        if create:
            _md.create_all(self.engine)
            return
        try:
            self._upgrade()
            n_jobs = self.run_info()["n_jobs"]  # the run row makes sense
            if self.engine.dialect.name == "sqlite":
                self._check_size(Path(url.removeprefix("sqlite:///")))
            self._check_job_rows(n_jobs)
        except (sa.exc.DatabaseError, sqlite3.DatabaseError) as exc:
            self.engine.dispose()
            raise self._error(exc) from None
        except RunError:
            self.engine.dispose()
            raise

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
        with self.engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).select_from(job_t)).scalar()
            lo = conn.execute(sa.select(sa.func.min(job_t.c.id))).scalar()
            hi = conn.execute(sa.select(sa.func.max(job_t.c.id))).scalar()
            if count != n or (n and (lo != 0 or hi != n - 1)):
                raise self._wrong_job_count(count)
            bad = conn.execute(_UNKNOWN_STATUS, _UNKNOWN_STATUS_PARAMS).first()
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

    def _damaged(self, what: str) -> DamagedStateError:
        return DamagedStateError(f"{self.where}: damaged run state: {what}")

    def _error(self, exc: BaseException) -> RunError:
        orig = getattr(exc, "orig", None) or exc
        msg = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        if "locked" in msg or "unable to open" in msg or "readonly" in msg:
            return RunError(f"{self.where}: cannot read run state: {msg}")  # not damage: say so
        return self._damaged(msg)

    def _unknown_status(self, status: Any) -> DamagedStateError:
        with self.engine.connect() as conn:
            name = conn.execute(sa.select(job_t.c.name).where(job_t.c.status == status).limit(1)).scalar()
        return self._damaged(f"job '{name}' has unknown status {status!r}")

    def _wrong_job_count(self, found: int) -> DamagedStateError:
        """The job rows do not match the run row: name the first missing (or extra) job id."""
        n = self.run_info()["n_jobs"]
        with self.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(sa.select(job_t.c.id).order_by(job_t.c.id))]
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

    def _upgrade(self) -> None:
        """Bring a store written by an older batchprod up to this schema (added tables, columns and
        indexes only), so such a run can still be restarted and reported. A store without the core
        tables is damaged, not old."""
        insp = sa.inspect(self.engine)
        tables = set(insp.get_table_names())
        for t in ("run", "job", "attempt"):
            if t not in tables:
                raise self._damaged(f"no '{t}' table")
        if "context" in {c["name"] for c in insp.get_columns("attempt")} and set(TABLES) <= tables:
            return
        with self.engine.begin() as conn:
            if "context" not in {c["name"] for c in insp.get_columns("attempt")}:
                conn.execute(sa.text("ALTER TABLE attempt ADD COLUMN context VARCHAR"))
        _md.create_all(self.engine)  # new tables and indexes; existing ones are left alone

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.engine.dispose()

    def _upsert(self, table: sa.Table, keys: Sequence[str]) -> Any:
        """INSERT .. ON CONFLICT UPDATE, built once per table (building it costs ~1 ms)."""
        ck = (table.name, tuple(keys))
        if ck not in self._stmts:
            ins = (postgresql if self.engine.dialect.name == "postgresql" else sqlite).insert(table)
            cols = {c.name: ins.excluded[c.name] for c in table.columns if c.name not in keys}
            self._stmts[ck] = ins.on_conflict_do_update(index_elements=list(keys), set_=cols)
        return self._stmts[ck]

    # -- creation -----------------------------------------------------------------------------------
    def init_run(self, name: str, submit_dir: str, wms: str, jobs: Iterable[Mapping[str, Any]]) -> int:
        """Create the run row and every job row (PENDING) in one transaction."""
        now = time.time()
        rows = [
            {
                "id": j["id"],
                "name": j["name"],
                "label": j["label"],
                "n_quanta": j["n_quanta"],
                "priority": j["priority"],
                "status": "PENDING",
                "attempts": 0,
                "retries": 0,
                "preemptions": 0,
                "infra_failures": 0,
                "request_memory": j["request_memory"],
                "updated": now,
            }
            for j in jobs
        ]
        with self.engine.begin() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(run_t)).scalar():
                raise RunError(f"{self.url}: run already initialised")
            conn.execute(
                run_t.insert().values(
                    id=1, name=name, submit_dir=submit_dir, wms=wms, status="PREPARED", n_jobs=len(rows),
                    created=now, updated=now,
                )
            )
            if self.engine.dialect.name == "sqlite":
                # the driver's executemany over tuples: ~10x faster than Core's per-dict processing,
                # which matters at 10^6 jobs
                cols = list(rows[0]) if rows else []
                sql = f"INSERT INTO job ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
                conn.exec_driver_sql(sql, [tuple(r[c] for c in cols) for r in rows])
            else:
                for i in range(0, len(rows), 50_000):
                    conn.execute(job_t.insert(), rows[i : i + 50_000])
        return len(rows)

    # -- run row ------------------------------------------------------------------------------------
    @_reading
    def run_info(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(run_t)).mappings().first()
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
            conn.execute(run_t.update().where(run_t.c.id == 1).values(**fields))

    # -- batched writes -----------------------------------------------------------------------------
    def write(
        self,
        jobs: Sequence[Mapping[str, Any]] = (),
        attempts: Sequence[Mapping[str, Any]] = (),
        outputs: Sequence[Mapping[str, Any]] = (),
        contexts: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Commit job rows (id + JOB_MUTABLE), attempt rows (upsert), outputs and new provenance
        contexts (hash -> record; known ones are kept) in one transaction."""
        if not (jobs or attempts or outputs or contexts):
            return
        # sanitized here too: a record from a remote wrapper of another version never stores a secret
        ctx_rows = [(h, json.dumps(sanitize_record(r), sort_keys=True)) for h, r in (contexts or {}).items()]
        if self.engine.dialect.name == "sqlite":
            self._write_sqlite(jobs, attempts, outputs, ctx_rows)
            return
        with self.engine.begin() as conn:
            if ctx_rows:
                ins = postgresql.insert(context_t).on_conflict_do_nothing(index_elements=["hash"])
                conn.execute(ins, [{"hash": h, "record": r} for h, r in ctx_rows])
            if jobs:
                if "job_update" not in self._stmts:
                    self._stmts["job_update"] = (
                        job_t.update()
                        .where(job_t.c.id == sa.bindparam("_id"))
                        .values({c: sa.bindparam(c) for c in JOB_MUTABLE})
                    )
                stmt = self._stmts["job_update"]
                conn.execute(stmt, [{"_id": j["id"], **{c: j.get(c) for c in JOB_MUTABLE}} for j in jobs])
            if attempts:
                conn.execute(
                    self._upsert(attempt_t, ("job_id", "number")),
                    [{c: a.get(c) for c in ATTEMPT_COLUMNS} for a in attempts],
                )
            if outputs:
                conn.execute(output_t.insert(), list(outputs))

    def _write_sqlite(
        self,
        jobs: Sequence[Mapping[str, Any]],
        attempts: Sequence[Mapping[str, Any]],
        outputs: Sequence[Mapping[str, Any]],
        contexts: Sequence[tuple[str, str]] = (),
    ) -> None:
        """The hot path on SQLite: the driver's executemany on one kept connection. SQLAlchemy Core
        costs ~0.7 ms per flush here, the driver ~0.1 ms, and the orchestrator flushes before every
        launch batch."""
        if self._raw is None:
            self._raw = self.engine.raw_connection()
            acols = [c for c in ATTEMPT_COLUMNS if c not in ("job_id", "number")]
            ocols = [c.name for c in output_t.columns if c.name != "id"]
            self._sql = {
                "job": f"UPDATE job SET {', '.join(f'{c}=?' for c in JOB_MUTABLE)} WHERE id=?",
                "attempt": f"INSERT INTO attempt ({', '.join(ATTEMPT_COLUMNS)}) VALUES "
                f"({', '.join('?' * len(ATTEMPT_COLUMNS))}) ON CONFLICT(job_id, number) DO UPDATE SET "
                + ", ".join(f"{c}=excluded.{c}" for c in acols),
                "output": f"INSERT INTO output ({', '.join(ocols)}) VALUES ({', '.join('?' * len(ocols))})",
                "ocols": ocols,  # type: ignore[dict-item]
            }
        raw, sql = self._raw, self._sql
        cur = raw.cursor()
        try:
            if jobs:
                cur.executemany(sql["job"], [tuple(j.get(c) for c in JOB_MUTABLE) + (j["id"],) for j in jobs])
            if attempts:
                cur.executemany(sql["attempt"], [tuple(a.get(c) for c in ATTEMPT_COLUMNS) for a in attempts])
            if outputs:
                cur.executemany(sql["output"], [tuple(o.get(c) for c in sql["ocols"]) for o in outputs])
            if contexts:
                cur.executemany("INSERT OR IGNORE INTO context (hash, record) VALUES (?, ?)", contexts)
            raw.commit()
        except BaseException:
            raw.rollback()
            raise
        finally:
            cur.close()

    # -- reads --------------------------------------------------------------------------------------
    @_reading
    def jobs(self, status: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = sa.select(job_t).order_by(job_t.c.id)
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
            r = conn.execute(sa.select(job_t).where(job_t.c.name == name)).mappings().first()
        if r is not None and r["status"] not in JOB_STATES:
            raise self._damaged(f"job '{name}' has unknown status {r['status']!r}")
        return dict(r) if r else None

    @_reading
    def job_columns(self, *cols: str) -> list[tuple[Any, ...]]:
        """Selected columns of every job, ordered by id (cheap bulk read for restart); every job of
        the run is there, with a known status."""
        with self.engine.connect() as conn:
            rows = [tuple(r) for r in conn.execute(sa.select(*[job_t.c[c] for c in cols]).order_by(job_t.c.id))]
        self._check_jobs(rows, cols.index("id") if "id" in cols else None,
                         cols.index("status") if "status" in cols else None)
        return rows

    @_reading
    def attempts(self, job_id: int | None = None, status: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        q = sa.select(attempt_t).order_by(attempt_t.c.job_id, attempt_t.c.number)
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
            .select_from(j.outerjoin(a, sa.and_(a.c.job_id == j.c.id, a.c.number == j.c.attempts)))
            .where(j.c.status.in_(statuses))
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
            rows = conn.execute(sa.select(context_t).where(context_t.c.hash.in_(wanted))).all()
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
        q = sa.select(output_t).order_by(output_t.c.id)
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
                q = sa.select(output_t).where(output_t.c.path.in_(wanted[i : i + 500]))
                out.update({r["path"]: dict(r) for r in conn.execute(q).mappings()})
        return out

    @_reading
    def begin_execution(self, host: str, pid: int) -> int:
        with self.engine.begin() as conn:
            return int(conn.execute(execution_t.insert().values(start=time.time(), host=host, pid=pid))
                       .inserted_primary_key[0])

    def end_execution(self, execution_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(execution_t.update().where(execution_t.c.id == execution_id).values(end=time.time()))

    @_reading
    def executions(self) -> list[dict[str, Any]]:
        """Engine sessions, oldest first; an unfinished one ends at the run's last job write."""
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.select(execution_t).order_by(execution_t.c.id)).mappings()]
            if rows and rows[-1]["end"] is None:
                rows[-1]["last_write"] = conn.execute(sa.select(sa.func.max(job_t.c.updated))).scalar()
        return rows

    def drop_outputs(self, job_id: int) -> None:
        """Forget a job's recorded outputs (its next success records them anew: the final job re-runs)."""
        with self.engine.begin() as conn:
            conn.execute(output_t.delete().where(output_t.c.job_id == job_id))

    def output_columns(self, *cols: str) -> list[tuple[Any, ...]]:
        """Selected columns of every output row (bulk read for ingest)."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(*[output_t.c[c] for c in cols]).order_by(output_t.c.id))]

    @_reading
    def outputs(self, job_id: int | None = None) -> list[dict[str, Any]]:
        q = sa.select(output_t).order_by(output_t.c.id)
        if job_id is not None:
            q = q.where(output_t.c.job_id == job_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    @_reading
    def counts_by_label(self) -> list[tuple[str, str, int, int]]:
        """(label, status, jobs, quanta) grouped in SQL: a report never loads every job. The groups
        say whether a job row is missing or has an unknown status, for free."""
        q = (
            sa.select(job_t.c.label, job_t.c.status, sa.func.count(), sa.func.sum(job_t.c.n_quanta))
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
