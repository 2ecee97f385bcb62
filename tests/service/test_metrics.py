"""GET /metrics over a real central database (SQLite, and PostgreSQL when $BATCHPROD_TEST_PG_URL is set):
a run submitted through the CLI, a campaign's run, site states and incidents written as the engine and
the operator's commands write them; the values parsed back with Prometheus' own parser."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from batchprod.campaign.db import CampaignDB
from batchprod.service.app import create_app
from batchprod.state.database import ENV_DB, select_db
from batchprod.state.store import StateStore, campaign_run_t, campaign_t
from batchprod.state.testdb import use_db
from batchprod.testing import command_task, write_submit

FAILING = {"tasks": {
    "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                              "test {detector} != 1 || {{ echo 'ValueError: bad detector' >&2; exit 3; }}; "
                              "cp {inputs.raw} {outputs.calexp}"),
}}
JOB_STATES = ("CANCELLED", "FAILED", "HELD", "KILLED", "PENDING", "QUEUED", "READY", "RUNNING", "SUCCEEDED",
              "UNREADY")
SITE_STATES = ("online", "degraded", "draining", "down", "probing")

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


@pytest.fixture(params=["sqlite", "postgresql"])
def central(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The central database's URL, selected through $BATCHPROD_DB as ``--db`` would."""
    if request.param == "postgresql":
        yield from use_db("postgresql", monkeypatch)  # type: ignore[misc]
        return
    select_db(None)
    url = f"sqlite:///{tmp_path / 'central.db'}"
    monkeypatch.setenv(ENV_DB, url)
    yield url


def scrape(client: TestClient) -> Samples:
    """GET /metrics, parsed: sample name -> sorted label pairs -> value."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_LATEST, r.text
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def by(samples: Samples, name: str, label: str) -> dict[str, float]:
    """One metric's values keyed by its one label."""
    return {dict(k)[label]: v for k, v in samples[name].items()}


def _job(i: int, status: str, now: float) -> dict[str, Any]:
    return {"id": i, "status": status, "attempts": 1, "retries": 0, "preemptions": 0, "infra_failures": 0,
            "request_memory": 100, "failure_class": None, "exit_code": None, "message": None, "updated": now}


def _attempt(job: int, number: int, status: str, start: float, site: str | None,
             fclass: str | None = None) -> dict[str, Any]:
    ended = status not in ("QUEUED", "RUNNING")
    return {"job_id": job, "number": number, "status": status, "start": start, "end": start + 1 if ended else None,
            "site": site, "failure_class": fclass}


def add_run(url: str, name: str, submit_dir: str, now: float, n: int = 5) -> None:
    """A run of ``n`` jobs: the first four in the states an engine leaves them, with their attempts
    (two started in the last 60 s, one not on a site yet), the others PENDING."""
    s = StateStore(url, create=True)
    try:
        s.init_run(name, submit_dir, "slurm", [
            {"id": i, "name": f"job{i}", "label": "a", "n_quanta": 1, "priority": 0, "request_memory": 100}
            for i in range(n)])
        s.write([_job(0, "SUCCEEDED", now), _job(1, "RUNNING", now), _job(2, "QUEUED", now),
                 _job(3, "FAILED", now)],
                [_attempt(0, 1, "SUCCEEDED", now - 600, "cluster"),
                 _attempt(1, 1, "FAILED", now - 700, "cluster", "oom"),
                 _attempt(1, 2, "RUNNING", now - 5, "cluster"),
                 _attempt(2, 1, "QUEUED", now - 3, None),  # handed over, no site yet
                 _attempt(3, 1, "FAILED", now - 800, "grid", "infrastructure")])
    finally:
        s.close()


def add_campaigns(url: str, submit_dir: str, now: float) -> None:
    """Campaign 'survey' (running) with the run of ``submit_dir`` and one not prepared yet; campaign
    'later' (planned), with no run."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            for cid, name, state in ((1, "survey", "running"), (2, "later", "planned")):
                conn.execute(campaign_t.insert().values(id=cid, name=name, owner="ops", priority=1, share=1.0,
                                                        state=state, spec="{}", created=now, updated=now))
            conn.execute(campaign_run_t.insert(), [
                {"campaign_id": 1, "step_id": 1, "config": "step1.yaml", "submit_dir": submit_dir, "state": "RUNNING"},
                {"campaign_id": 1, "step_id": 2, "config": "step2.yaml", "submit_dir": None, "state": "planned"}])
    finally:
        engine.dispose()


@pytest.fixture
def populated(central: str, tmp_path: Path, toy_repo: Path, cli) -> str:
    """A failed run in no campaign (4 jobs on site 'local': 2 succeeded, 2 user errors, all started
    just now), a campaign's run, two sites and their incidents."""
    r = cli("submit", write_submit(tmp_path, FAILING, repo=toy_repo, payload={"outputRun": "toy/bad"}))
    assert r.exit_code == 1, r.output
    now = time.time()
    add_run(central, "survey/step1", str(tmp_path / "campaign" / "survey-step1"), now)
    add_campaigns(central, str(tmp_path / "campaign" / "survey-step1"), now)
    db = CampaignDB(central)
    try:
        db.set_site("cluster", "degraded", now - 50, "infrastructure failure rate 0.4", {}, True, now)
        db.set_site("grid", "down", now - 30, "no answer for 130 s", {}, True, now)
        db.raise_incident("site_down", "grid: no answer", "", "grid", "no answer for 130 s", [], now)
        db.raise_incident("site_degraded", "cluster: failure rate", "", "cluster", "rate 0.4", [], now - 100)
        db.resolve_incidents("site_degraded", "cluster", now, "rate back to 0.1")
        db.raise_incident("job_failed", "ValueError: bad detector", "", None, "exit 3", ["toy/bad"], now, count=2)
    finally:
        db.close()
    return central


def test_metrics_are_the_database_counts(populated: str, tmp_path: Path) -> None:
    m = scrape(TestClient(create_app(tmp_path / "submit")))  # the database of $BATCHPROD_DB
    assert m["batchprod_db_up"] == {(): 1}

    jobs = {(dict(k)["campaign"], dict(k)["state"]): v for k, v in m["batchprod_jobs"].items()}
    assert {k: v for k, v in jobs.items() if v} == {
        ("", "FAILED"): 2, ("", "SUCCEEDED"): 2,
        ("survey", "SUCCEEDED"): 1, ("survey", "RUNNING"): 1, ("survey", "QUEUED"): 1, ("survey", "FAILED"): 1,
        ("survey", "PENDING"): 1}
    # every state of every campaign is there, as 0 when no job is in it (the planned campaign too)
    assert set(jobs) == {(c, s) for c in ("", "survey", "later") for s in JOB_STATES}

    assert by(m, "batchprod_attempts_running", "site") == {"": 1, "cluster": 1, "grid": 0, "local": 0}
    on_site = {tuple(dict(k)[x] for x in ("campaign", "site", "state")): v
               for k, v in m["batchprod_jobs_on_site"].items()}
    assert on_site == {("survey", "cluster", "RUNNING"): 1, ("survey", "", "QUEUED"): 1}
    ended = {(dict(k)["site"], dict(k)["outcome"]): v for k, v in m["batchprod_attempts_total"].items()}
    assert ended == {("local", "succeeded"): 2, ("local", "user_error"): 2, ("cluster", "succeeded"): 1,
                     ("cluster", "oom"): 1, ("grid", "infrastructure"): 1}
    assert by(m, "batchprod_failures_total", "failure_class") == {"user_error": 2, "oom": 1, "infrastructure": 1}
    # started in the last 60 s: the CLI's run (just now) and the campaign run's two latest attempts
    assert by(m, "batchprod_dispatch_rate", "site") == pytest.approx(
        {"local": 4 / 60, "cluster": 1 / 60, "": 1 / 60, "grid": 0.0})

    sites = {(dict(k)["site"], dict(k)["state"]): v for k, v in m["batchprod_site_state"].items()}
    assert sites == {**{("cluster", s): float(s == "degraded") for s in SITE_STATES},
                     **{("grid", s): float(s == "down") for s in SITE_STATES}}
    assert by(m, "batchprod_incidents_open", "kind") == {"site_down": 1, "job_failed": 1}  # not the resolved one
    assert by(m, "batchprod_campaigns", "state") == {"planned": 1, "running": 1, "paused": 0, "done": 0,
                                                    "failed": 0, "cancelled": 0}


def test_a_scrape_makes_the_same_few_queries_for_any_number_of_jobs(populated: str, tmp_path: Path) -> None:
    client = TestClient(create_app(tmp_path / "submit", db=populated))
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(sa.Engine, "before_cursor_execute", count)
    try:
        scrape(client)
        few = len(statements)
        add_run(populated, "big", str(tmp_path / "big"), time.time(), n=3000)  # in no campaign
        statements.clear()
        m = scrape(client)
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", count)
    assert len(statements) == few, statements
    # the opening checks (schema revision), then one query of the job table and one of the attempt table
    assert len([q for q in statements if "job" in q or "attempt" in q]) == 2, statements
    assert m["batchprod_jobs"][(("campaign", ""), ("state", "PENDING"))] == 2996
    assert m["batchprod_attempts_running"][(("site", "cluster"),)] == 2


def test_without_a_central_database_metrics_still_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    select_db(None)
    monkeypatch.delenv(ENV_DB, raising=False)
    assert scrape(TestClient(create_app(tmp_path))) == {"batchprod_db_up": {(): 0}}
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x00garbage" * 100)
    secret = "postgresql+psycopg://ops:s3cret@127.0.0.1:1/x?connect_timeout=1"
    for url in (f"sqlite:///{tmp_path / 'none.db'}", f"sqlite:///{garbage}", secret):
        client = TestClient(create_app(tmp_path, db=url))
        assert scrape(client) == {"batchprod_db_up": {(): 0}}, url
        assert client.get("/api/runs").json() == []  # the rest of the service is unaffected
    assert "metrics: " in caplog.text and "s3cret" not in caplog.text
