"""The state store on every database it supports: a run's own SQLite file, a central SQLite file and
a central PostgreSQL database (a fresh schema per test): batched writes, events written with them,
many runs in one database, migrations from the baseline, and bad databases as one line."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from batchprod.errors import RunError
from batchprod.state import migrate
from batchprod.state import store as store_mod
from batchprod.state.database import DB_FILE, public_url, read_pointer, select_db
from batchprod.state.migrations import baseline
from batchprod.state.store import SCHEMA_REVISION, STATE_FILE, DamagedStateError, StateStore
from batchprod.state.testdb import fresh_schema, pg_unavailable, use_db


@pytest.fixture(params=["file", "sqlite-central", "postgresql"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh PostgreSQL schema's URL (skipped without a server, failed in CI)."""
    yield from use_db("postgresql", monkeypatch)  # type: ignore[misc]


@pytest.fixture
def url(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Where a store goes: a per-run file path, or a central database URL."""
    if kind == "file":
        yield str(tmp_path / STATE_FILE)
    elif kind == "sqlite-central":
        yield f"sqlite:///{tmp_path / 'central.db'}"
    else:
        yield from use_db("postgresql", monkeypatch)  # type: ignore[misc]


def _jobs(n: int) -> list[dict]:
    return [{"id": i, "name": f"job{i}", "label": "a" if i % 2 else "b", "n_quanta": 1, "priority": 0,
             "request_memory": 100} for i in range(n)]


def _job(i: int, status: str, attempts: int = 1, message: str | None = None) -> dict:
    return {"id": i, "status": status, "attempts": attempts, "retries": 0, "preemptions": 0, "infra_failures": 0,
            "request_memory": 100, "failure_class": None, "exit_code": None, "message": message,
            "updated": time.time()}


def _new(url: str, name: str = "r1", n: int = 5, sd: str | None = None) -> StateStore:
    s = StateStore(url, create=True)
    s.init_run(name, sd or f"/submit/{name}", "local", _jobs(n))
    return s


def _open(url: str, name: str = "r1") -> StateStore:
    return StateStore(url) if "://" not in url else StateStore(url, run=name)


def test_write_read_and_events(url: str) -> None:
    s = _new(url)
    assert s.run_info()["n_jobs"] == 5 and s.run_info()["status"] == "PREPARED"
    s.write([_job(1, "RUNNING")], [{"job_id": 1, "number": 1, "status": "RUNNING", "start": 1.0, "end": None}],
            contexts={"h": {"host": "x"}})
    s.write([_job(1, "RUNNING", message="still")])  # no state change: no event
    s.write([_job(1, "SUCCEEDED"), _job(2, "FAILED", message="exit 3")],
            [{"job_id": 1, "number": 1, "status": "SUCCEEDED", "start": 1.0, "end": 2.0, "context": "h"},
             {"job_id": 2, "number": 1, "status": "FAILED", "exit_code": 3}],
            [{"job_id": 1, "node_id": "n1", "dataset_type": "calexp", "data_id": '{"visit": 1}', "path": "/p/1",
              "size": 10, "checksum": "c"}], {"h": {"host": "x"}})
    s.close()
    s = _open(url)
    assert [(j["id"], j["status"]) for j in s.jobs()][:3] == [(0, "PENDING"), (1, "SUCCEEDED"), (2, "FAILED")]
    assert "run_id" not in s.jobs()[0] and "run_id" not in s.attempts()[0]
    assert [(a["job_id"], a["number"], a["status"], a["end"]) for a in s.attempts()] == [
        (1, 1, "SUCCEEDED", 2.0), (2, 1, "FAILED", None)]  # upserted, not duplicated
    assert s.job_columns("id", "status")[2] == (2, "FAILED")
    assert s.job_by_name("job2")["message"] == "exit 3"
    assert s.last_attempts("FAILED")[0]["name"] == "job2"
    assert s.outputs(1)[0]["path"] == "/p/1" and s.find_outputs(dataset_type="calexp")[0]["job_id"] == 1
    assert set(s.outputs_by_path(["/p/1", "/nope"])) == {"/p/1"}
    assert s.output_columns("path", "size") == [("/p/1", 10)]
    assert s.contexts(["h"])["h"]["host"] == "x"
    assert sum(n for _, _, n, _ in s.counts_by_label()) == 5
    ev = s.events()
    assert [(e["job"], e["state"], e["attempt"]) for e in ev] == [
        ("job1", "RUNNING", 1), ("job1", "SUCCEEDED", 1), ("job2", "FAILED", 1)]
    assert ev[2]["message"] == "exit 3" and all(e["time"] > 0 for e in ev)
    assert [e["state"] for e in s.events(since_id=ev[0]["id"], limit=1)] == ["SUCCEEDED"]
    ex = s.begin_execution("host", 42)
    assert s.executions()[-1]["end"] is None
    s.end_execution(ex)
    assert s.executions()[-1]["end"] is not None
    s.drop_outputs(1)
    assert s.outputs() == []
    s.set_run(status="SUCCEEDED")
    assert s.run_info()["status"] == "SUCCEEDED"
    s.close()


def test_a_failed_write_leaves_nothing_not_even_events(url: str) -> None:
    s = _new(url)
    with pytest.raises(Exception):  # noqa: B017 (the driver's own error: an output without its path)
        s.write([_job(0, "SUCCEEDED")], [], [{"job_id": 0, "node_id": "n", "dataset_type": "t", "data_id": "{}",
                                              "path": None}])
    assert s.jobs()[0]["status"] == "PENDING" and s.events() == []
    s.close()


def test_many_runs_in_one_database(kind: str, url: str) -> None:
    if kind == "file":
        pytest.skip("a per-run file holds one run")
    a, b = _new(url, "a", 3), _new(url, "u/me/b", 4)  # the same job names in both
    a.write([_job(0, "RUNNING")], [{"job_id": 0, "number": 1, "status": "RUNNING"}], contexts={"h": {"x": 1}})
    b.write([_job(0, "FAILED"), _job(3, "RUNNING")], [{"job_id": 0, "number": 1, "status": "FAILED"}],
            [{"job_id": 0, "node_id": "n", "dataset_type": "t", "data_id": "{}", "path": "/b"}], {"h": {"x": 2}})
    assert a.engine is b.engine  # one engine per URL in a process
    for s, n, st, nev in ((a, 3, "RUNNING", 1), (b, 4, "FAILED", 2)):
        s2 = StateStore(url, run=s.run_name)
        assert len(s2.jobs()) == n and s2.jobs()[0]["status"] == st and len(s2.events()) == nev
        assert [x["status"] for x in s2.attempts()] == [st] and s2.job_by_name("job0")["status"] == st
        s2.close()
    assert a.outputs() == [] and len(b.outputs()) == 1 and a.contexts(["h"])["h"]["x"] == 1
    assert {r["name"] for r in a.runs()} == {"a", "u/me/b"}
    with pytest.raises(RunError, match="no run 'c' in this database"):
        StateStore(url, run="c")
    c = _new(url, "a", 1, sd="/submit/other-repo/a")  # output run names repeat across repositories
    with pytest.raises(RunError, match="several runs are named 'a'"):
        StateStore(url, run="a")
    assert len(StateStore(url, run=c.run_id).jobs()) == 1  # a run is its id (its submit directory)
    for s in (a, b, c):
        s.close()


def test_a_run_whose_submit_dir_is_gone_is_replaced(kind: str, url: str, tmp_path: Path) -> None:
    if kind == "file":
        pytest.skip("central databases only")
    old = _new(url, "r", 2, sd=str(tmp_path / "sd"))  # its directory never made (or deleted since)
    new = _new(url, "r", 3, sd=str(tmp_path / "sd"))
    assert [r["id"] for r in new.runs()] == [new.run_id] and len(new.jobs()) == 3
    (tmp_path / "sd").mkdir()
    with pytest.raises(RunError, match=r"run 'r' of .*/sd is already recorded here"):
        _new(url, "r", 1, sd=str(tmp_path / "sd"))
    old.close()
    new.close()


def test_schema_revision_is_alembic_head() -> None:
    assert migrate.head_revision() == SCHEMA_REVISION == migrate.REVISIONS[-1]


def _schema(engine: sa.Engine) -> dict:
    insp = sa.inspect(engine)
    out = {}
    for t in sorted(insp.get_table_names()):
        out[t] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(t)],
            "pk": insp.get_pk_constraint(t)["constrained_columns"],
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(t)),
            "fks": sorted((tuple(f["constrained_columns"]), f["referred_table"]) for f in insp.get_foreign_keys(t)),
        }
    return out


def _migrated_from_empty(url: str) -> None:
    from alembic import command

    eng = sa.create_engine(url)
    with eng.begin() as conn:
        command.upgrade(migrate.alembic_config(conn), "head")
    eng.dispose()


def test_fresh_schema_equals_the_migrated_one(tmp_path: Path, pg: str) -> None:
    fresh = tmp_path / "fresh.db"
    StateStore(fresh, create=True).close()
    _migrated_from_empty(f"sqlite:///{tmp_path / 'migrated.db'}")
    a, b = sa.create_engine(f"sqlite:///{fresh}"), sa.create_engine(f"sqlite:///{tmp_path / 'migrated.db'}")
    assert _schema(a) == _schema(b)
    a.dispose()
    b.dispose()
    StateStore(pg, create=True).close()
    with fresh_schema() as other:
        _migrated_from_empty(other)
        a, b = sa.create_engine(pg), sa.create_engine(other)
        assert _schema(a) == _schema(b)
        a.dispose()
        b.dispose()


def _legacy(url: str, old: bool = False) -> None:
    """A run's database as batchprod wrote it before Alembic: the baseline tables, one run (id 1), no
    version table; ``old``: from before provenance (no attempt.context, no context/output/execution)."""
    eng = sa.create_engine(url)
    md = baseline.metadata
    tables = [md.tables[t] for t in (("run", "job", "attempt") if old else md.tables)]
    md.create_all(eng, tables=tables)
    with eng.begin() as conn:
        if old:
            conn.exec_driver_sql("ALTER TABLE attempt DROP COLUMN context")
        conn.execute(md.tables["run"].insert().values(id=1, name="old", submit_dir="/s", wms="local", status="FAILED",
                                                      n_jobs=3, created=1.0, updated=2.0))
        conn.execute(md.tables["job"].insert(), [
            {"id": i, "name": f"job{i}", "label": "a", "n_quanta": 1, "priority": 0, "status": st, "attempts": 1,
             "retries": 0, "preemptions": 0, "infra_failures": 0, "request_memory": 100}
            for i, st in enumerate(("SUCCEEDED", "FAILED", "UNREADY"))])
        conn.execute(md.tables["attempt"].insert(), [{"job_id": 0, "number": 1, "status": "SUCCEEDED"},
                                                     {"job_id": 1, "number": 1, "status": "FAILED"}])
        if not old:
            conn.execute(md.tables["output"].insert().values(id=7, job_id=0, node_id="n", dataset_type="t",
                                                             data_id="{}", path="/o"))
            conn.execute(md.tables["execution"].insert().values(id=1, start=1.0, end=2.0))
            conn.execute(md.tables["context"].insert().values(hash="h", record=json.dumps({"host": "x"})))
    eng.dispose()


@pytest.mark.parametrize("old", [False, True], ids=["baseline", "before-provenance"])
def test_a_run_from_before_alembic_is_stamped_and_upgraded(tmp_path: Path, old: bool) -> None:
    path = tmp_path / STATE_FILE
    _legacy(f"sqlite:///{path}", old)
    s = StateStore(path)
    assert s.run_info()["name"] == "old" and [j["status"] for j in s.jobs()] == ["SUCCEEDED", "FAILED", "UNREADY"]
    assert len(s.attempts()) == 2 and len(s.outputs()) == (0 if old else 1)
    assert s.contexts(["x"]) == {} and "context" in s.attempts()[0]  # provenance columns added on open
    s.write([_job(1, "SUCCEEDED", 2)], [{"job_id": 1, "number": 2, "status": "SUCCEEDED"}],
            [{"job_id": 1, "node_id": "m", "dataset_type": "t", "data_id": "{}", "path": "/q"}])
    assert [e["state"] for e in s.events()] == ["SUCCEEDED"]
    assert [o["id"] for o in s.outputs()] == ([1] if old else [7, 8])
    s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(SCHEMA_REVISION,)]
    db.close()
    _ = StateStore(path).jobs()  # opens again without migrating


def test_a_postgresql_database_at_the_baseline_is_upgraded(pg: str) -> None:
    _legacy(pg)
    s = StateStore(pg, run="old")
    assert len(s.jobs()) == 3 and s.outputs()[0]["id"] == 7 and s.contexts(["h"])["h"]["host"] == "x"
    s.write([], [], [{"job_id": 1, "node_id": "m", "dataset_type": "t", "data_id": "{}", "path": "/q"}])
    assert [o["id"] for o in s.outputs()] == [7, 8]  # the serial goes on after the copied ids
    s.close()
    s = StateStore(pg, create=True)  # and it now takes more runs
    s.init_run("new", "/s2", "local", _jobs(2))
    assert s.run_id == 2
    s.close()


def test_a_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    _legacy(f"sqlite:///{path}")
    with sqlite3.connect(path) as db:  # two runs named alike: the new unique index cannot be made
        db.execute("INSERT INTO run (id, name, submit_dir, wms, status, n_jobs, created, updated) "
                   "VALUES (2, 'old', '/s', 'local', 'FAILED', 0, 1, 1)")
    db.close()
    before = path.read_bytes()
    with pytest.raises(DamagedStateError, match="UNIQUE constraint failed"):
        StateStore(path)
    with sqlite3.connect(path) as db:
        assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")} == set(
            baseline.metadata.tables)
    db.close()
    assert len(path.read_bytes()) == len(before)


# -- bad databases: one line naming them ---------------------------------------------------------------
def test_bad_urls_and_databases(tmp_path: Path, pg: str) -> None:
    for bad, msg in (("postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "database error"),
                     ("mysql://u:s3cret@h/x", "unsupported database 'mysql'"),
                     ("sqlite://", "in-memory SQLite"),
                     ("not a url://u:s3cret@x", "not a database URL"),
                     (f"sqlite:///{tmp_path}/none.db", "no such database file")):
        with pytest.raises(RunError, match=msg) as exc:
            StateStore(bad, run="r")
        assert "s3cret" not in str(exc.value) and len(str(exc.value).splitlines()) == 1
    with pytest.raises(RunError, match="no batchprod runs in this database"):
        StateStore(pg, run="r")
    eng = sa.create_engine(pg)
    with eng.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id int)")
    with pytest.raises(RunError, match=r"not a batchprod database \(it holds other tables: customers\)"):
        StateStore(pg, create=True)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE customers")
        conn.exec_driver_sql("CREATE TABLE alembic_version (version_num varchar(32) primary key)")
        conn.exec_driver_sql("INSERT INTO alembic_version VALUES ('abc123')")
    eng.dispose()
    with pytest.raises(RunError, match="schema revision 'abc123' is not one this batchprod knows"):
        StateStore(pg, create=True)


def test_public_url_drops_every_password() -> None:
    assert public_url("postgresql+psycopg://me:pw@h:5/db?password=x&sslmode=require") == \
        "postgresql+psycopg://me@h:5/db?sslmode=require"


# -- runs in a central database through the CLI ---------------------------------------------------------
def test_cli_runs_in_a_central_database(tmp_path: Path, toy_repo: Path, cli, pg: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from batchprod.testing import write_submit

    monkeypatch.delenv("BATCHPROD_DB")
    secret = pg.replace("batchprod:batchprod@", "batchprod:s3cretpw@")  # the test server trusts any password
    r = cli("submit", write_submit(tmp_path, repo=toy_repo), "--db", secret)
    assert r.exit_code == 0, r.output
    sd = tmp_path / "submit" / "toy" / "run"
    assert not (sd / STATE_FILE).exists()
    pointer = json.loads((sd / DB_FILE).read_text())
    assert pointer == {"url": public_url(pg), "run": "toy/run", "run_id": 1}
    for f in tmp_path.rglob("*"):  # the password is written nowhere
        if f.is_file():
            assert b"s3cretpw" not in f.read_bytes(), f
    select_db(None)  # a new process: the URL must be given again
    r = cli("report", sd)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "is kept in postgresql+psycopg://batchprod@127.0.0.1" in r.output and "--db" in r.output
    assert "s3cretpw" not in r.output
    r = cli("report", sd, "--db", f"sqlite:///{tmp_path}/other.db")
    assert r.exit_code == 2 and "not in sqlite:///" in r.output
    r = cli("report", "toy/run", "--root", tmp_path / "elsewhere", "--db", secret, "--json")  # found by name
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["jobs"]["succeeded"] == 6
    r = cli("runs", "--root", tmp_path / "submit", "--json")
    assert r.exit_code == 0 and json.loads(r.output)[0]["run"] == "toy/run"
    assert cli("restart", "toy/run", "--root", tmp_path / "submit").exit_code == 0
    assert read_pointer(sd) == (secret, "toy/run", 1)
    s = StateStore(secret, run="toy/run")
    # QUEUED is always committed (before the attempt starts); RUNNING only if a flush fell while it ran
    assert {e["state"] for e in s.events()} >= {"QUEUED", "SUCCEEDED"}
    s.close()


def test_pg_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHPROD_TEST_PG_URL", "postgresql+psycopg://u@127.0.0.1:1/x")
    assert "unreachable" in (pg_unavailable() or "")


def test_shared_engine_is_released(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    a = _new(url, "a")
    b = StateStore(url, run="a")
    assert a.engine is b.engine and store_mod._shared[url][1] == 2
    a.close()
    b.close()
    assert url not in store_mod._shared


def test_a_bad_database_leaves_nothing_behind(tmp_path: Path, toy_repo: Path, cli,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from batchprod.testing import write_submit

    monkeypatch.chdir(tmp_path)
    cfg = write_submit(tmp_path, repo=toy_repo)
    for bad in ("nonsense", "postgresql+psycopg://u:s3cret@127.0.0.1:1/x", f"sqlite:///{tmp_path}/no/such/dir.db"):
        r = cli("submit", cfg, "--db", bad)
        out = r.output.strip()
        assert r.exit_code == 2 and len(out.splitlines()) == 1 and out.startswith("error: "), out
        assert "s3cret" not in out and "Traceback" not in out
        assert not (tmp_path / "submit" / "toy" / "run").exists() and not (tmp_path / "nonsense").exists()
    select_db(None)


def test_a_pointer_to_another_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    select_db(url)
    try:
        sd = tmp_path / "sd"
        sd.mkdir()
        s = store_mod.create_store(sd, "mine")
        s.init_run("mine", str(sd), "local", _jobs(2))
        s.close()
        from batchprod.state.run import Run

        assert Run(sd).name == "mine"
        pointer = json.loads((sd / DB_FILE).read_text())
        (sd / DB_FILE).write_text(json.dumps({**pointer, "run": "theirs"}))
        with pytest.raises(RunError, match=r"run 1 of sqlite:///.* is 'mine' .* not this run \('theirs'\)"):
            Run(sd)
        (sd / DB_FILE).write_text("{")
        with pytest.raises(RunError, match="damaged run file"):
            Run(sd)
    finally:
        select_db(None)


@pytest.mark.parametrize("n", [1, 30])  # a few rows (plain statements) and many (one statement per table)
def test_a_job_changed_twice_in_one_flush_is_two_events(url: str, n: int) -> None:
    s = _new(url, n=n)
    ids = range(n)
    s.write([_job(i, "RUNNING") for i in ids] + [_job(i, "SUCCEEDED", message="done") for i in ids],
            [{"job_id": i, "number": 1, "status": "RUNNING"} for i in ids]
            + [{"job_id": i, "number": 1, "status": "SUCCEEDED", "exit_code": 0} for i in ids])
    assert {(j["status"], j["message"]) for j in s.jobs()} == {("SUCCEEDED", "done")}
    assert [(a["status"], a["exit_code"]) for a in s.attempts()] == [("SUCCEEDED", 0)] * n
    ev = s.events(limit=None)
    assert len(ev) == 2 * n and [e["state"] for e in ev if e["job_id"] == 0] == ["RUNNING", "SUCCEEDED"]
    s.close()
