"""The REST API and dashboard, served by a real `batchprod serve` process and queried over HTTP."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from batchprod.service.app import create_app
from batchprod.testing import command_task, write_submit

FAILING = {"tasks": {
    "calibrate": command_task(["visit", "detector"], ["raw"], ["calexp"],
                              "test {detector} != 1 || {{ echo 'ValueError: bad detector' >&2; exit 3; }}; "
                              "cp {inputs.raw} {outputs.calexp}"),
}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path, toy_repo: Path, cli) -> Iterator[tuple[httpx.Client, Path]]:
    assert cli("submit", write_submit(tmp_path, repo=toy_repo, payload={"outputRun": "toy/ok"})).exit_code == 0
    assert cli("submit", write_submit(tmp_path, FAILING, repo=toy_repo, payload={"outputRun": "toy/bad"})).exit_code == 1
    # a run outside the root: the API must not reach it
    assert cli("submit", write_submit(tmp_path / "elsewhere", repo=toy_repo,
                                      payload={"outputRun": "other/run"})).exit_code == 0
    port = free_port()
    root = tmp_path / "submit"
    proc = subprocess.Popen([sys.executable, "-m", "batchprod.cli", "serve", "--root", str(root), "--port", str(port)],
                            stderr=subprocess.PIPE)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.get("/api/runs")
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                assert time.monotonic() < deadline, "service did not start"
                time.sleep(0.1)
        yield client, root
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


def test_runs_and_run_agree_with_the_cli(served: tuple[httpx.Client, Path], cli) -> None:
    client, root = served
    runs = client.get("/api/runs").json()
    assert sorted((r["name"], r["status"]) for r in runs) == [("toy/bad", "FAILED"), ("toy/ok", "SUCCEEDED")]
    ok = client.get("/api/runs/toy/ok").json()
    cli_report = json.loads(cli("report", root / "toy" / "ok", "--json").output)
    assert ok["jobs"] == cli_report["jobs"] and ok["labels"] == cli_report["labels"]
    from datetime import datetime

    # times as ISO 8601 with the zone, never raw epochs
    assert datetime.fromisoformat(ok["created"]).tzinfo is not None and ok["started"] and ok["ended"]
    job = client.get("/api/runs/toy/ok/jobs/calibrate_visit1_detector1").json()
    assert all(isinstance(a["start"], str) and datetime.fromisoformat(a["end"]) for a in job["attempts_detail"])


def test_failures_jobs_and_provenance(served: tuple[httpx.Client, Path]) -> None:
    client, _ = served
    f = client.get("/api/runs/toy/bad/failures").json()
    assert f["failed"] == 2 and f["groups"][0]["signature"] == "ValueError: bad detector"
    assert f["jobs"][0]["error_line"] == "ValueError: bad detector"
    job = client.get("/api/runs/toy/bad/jobs/calibrate_visit1_detector1").json()
    assert job["status"] == "FAILED" and job["attempts_detail"][0]["exit_code"] == 3
    rec = client.get("/api/runs/toy/ok/provenance", params={"dataset": "coadd:tract=0,patch=0"}).json()
    assert rec["job"]["name"] == "coadd_tract0_patch0" and len(rec["inputs"]) == 2
    up = client.get("/api/runs/toy/ok/provenance", params={"dataset": "coadd:tract=0,patch=0", "lineage": "up"})
    assert [q["label"] for q in up.json()["quanta"]] == ["calibrate", "calibrate", "coadd"]


def test_errors_are_json_and_nothing_outside_the_root_is_served(served: tuple[httpx.Client, Path]) -> None:
    client, _ = served
    r = client.get("/api/runs/toy/ok/jobs/nosuch")
    assert r.status_code == 404 and r.json()["detail"] == "run 'toy/ok': no job named 'nosuch'"
    r = client.get("/api/runs/toy/ok/provenance", params={"dataset": "coadd:tract=,patch=1"})
    assert r.status_code == 400 and "expected TYPE:dim=value,dim=value" in r.json()["detail"]
    assert client.get("/api/runs/nosuch/run").status_code == 404
    assert client.get("/api/runs/..%2Felsewhere%2Fsubmit%2Fother%2Frun").status_code == 404
    assert client.get("/api/runs/toy/ok/provenance", params={"dataset": "x", "lineage": "sideways"}).status_code == 422


def test_dashboard_shows_every_run(served: tuple[httpx.Client, Path]) -> None:
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "toy/ok" in page.text and "toy/bad" in page.text and "6 jobs: succeeded 6" in page.text and "failed 2" in page.text


# -- damaged runs and files outside a run (in-process client: a server exception fails the test) -------
@pytest.fixture
def damaged_root(tmp_path: Path, toy_repo: Path, cli) -> Path:
    """Under one root: a good run, a failed one, and runs damaged or planted in every way."""
    for run, pipeline in (("ok", None), ("bad", FAILING), ("garbage", None), ("status", None), ("deleted", None),
                          ("graph", None), ("planted", None)):
        r = cli("submit", write_submit(tmp_path / run, pipeline, repo=toy_repo, payload={"outputRun": f"toy/{run}"},
                                       submitPath=str(tmp_path / "submit" / "{outputRun}")))
        assert r.exit_code in (0, 1), r.output
    elsewhere = tmp_path / "elsewhere"
    assert cli("submit", write_submit(elsewhere, repo=toy_repo, payload={"outputRun": "other/run"})).exit_code == 0
    root = tmp_path / "submit" / "toy"
    (root / "garbage" / "state.db").write_bytes(b"\x00garbage" * 100)
    for run, statement in (("status", "UPDATE job SET status = 'EXPLODED' WHERE id = 1"),
                           ("deleted", "DELETE FROM job WHERE id = 3")):
        with sqlite3.connect(root / run / "state.db") as db:
            db.execute(statement)
        db.close()
    (root / "graph" / "qgraph.bpqg").write_bytes(b"PK\x03\x04 not a zip")
    # a run whose state store is another run's, outside the root
    (root / "planted" / "state.db").unlink()
    (root / "planted" / "state.db").symlink_to(elsewhere / "submit" / "other" / "run" / "state.db")
    return tmp_path / "submit"


def test_damaged_runs_are_flagged_not_fatal(damaged_root: Path) -> None:
    client = TestClient(create_app(damaged_root))
    runs = {r["name"]: r for r in client.get("/api/runs").json()}
    assert {n: r["status"] for n, r in runs.items()} == {
        "toy/ok": "SUCCEEDED", "toy/bad": "FAILED", "toy/graph": "SUCCEEDED",  # the listing needs no graph
        "toy/garbage": "DAMAGED", "toy/status": "DAMAGED", "toy/deleted": "DAMAGED", "toy/planted": "DAMAGED"}
    g = runs["toy/garbage"]["error"]
    assert g == f"{damaged_root / 'toy/garbage/state.db'}: damaged run state: file is not a database"
    assert runs["toy/status"]["error"].endswith("damaged run state: job 'calibrate_visit1_detector1' has unknown "
                                                "status 'EXPLODED'")
    assert runs["toy/deleted"]["error"].endswith("damaged run state: job 3 of 6 is missing (1 job rows deleted?)")
    assert "leads outside the run directory" in runs["toy/planted"]["error"]
    page = client.get("/")
    assert page.status_code == 200 and page.text.count("DAMAGED</small>") == 4 and "6 jobs: succeeded 6" in page.text and "failed 2" in page.text
    assert "file is not a database" in page.text

    for name, status, fragment in (("toy/garbage", 500, "damaged run state: file is not a database"),
                                   ("toy/status", 500, "has unknown status 'EXPLODED'"),
                                   ("toy/planted", 403, "leads outside the run directory")):
        for url in (f"/api/runs/{name}", f"/api/runs/{name}/failures", f"/api/runs/{name}/jobs/coadd_tract0_patch0"):
            r = client.get(url)
            assert r.status_code == status and fragment in r.json()["detail"], (url, r.text)
            assert "Traceback" not in r.text and len(r.json()["detail"].splitlines()) == 1
    r = client.get("/api/runs/toy/graph/jobs/coadd_tract0_patch0")
    assert r.status_code == 500 and r.json() == {
        "detail": f"{damaged_root / 'toy/graph/qgraph.bpqg'}: cannot read quantum graph: not a readable array file "
                  "(File is not a zip file)", "status": "DAMAGED"}


def test_a_log_symlinked_outside_the_run_is_not_served(damaged_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:the secret line\n")
    logs = damaged_root / "toy" / "bad" / "logs" / "calibrate"
    for err in logs.glob("*.err"):
        err.unlink()
        err.symlink_to(secret)
    with sqlite3.connect(damaged_root / "toy" / "bad" / "state.db") as db:  # and a recorded path outside
        db.execute("UPDATE attempt SET stderr = ? WHERE job_id = 3", (str(secret),))
    db.close()
    client = TestClient(create_app(damaged_root))
    r = client.get("/api/runs/toy/bad/failures")
    assert r.status_code == 200 and r.json()["failed"] == 2
    assert "the secret line" not in r.text
    assert all(j["stderr_tail"][0].startswith("<not shown: ") for j in r.json()["jobs"])
    assert os.access(secret, os.R_OK)


def test_runs_of_a_central_database_are_served(tmp_path: Path, toy_repo: Path, cli, monkeypatch) -> None:
    db = f"sqlite:///{tmp_path / 'central.db'}"
    monkeypatch.setenv("BATCHPROD_DB", db)
    assert cli("submit", write_submit(tmp_path, repo=toy_repo, payload={"outputRun": "toy/c"})).exit_code == 0
    run_dir = tmp_path / "submit" / "toy" / "c"
    assert not (run_dir / "state.db").exists() and (run_dir / "state-db.json").is_file()
    client = TestClient(create_app(tmp_path / "submit"))
    runs = client.get("/api/runs").json()
    assert [r["name"] for r in runs] == ["toy/c"] and runs[0]["status"] == "SUCCEEDED"
    assert client.get("/api/runs/toy/c").json()["jobs"]["succeeded"] == 6
