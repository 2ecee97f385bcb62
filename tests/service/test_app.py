"""The REST API and dashboard, served by a real `batchprod serve` process and queried over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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


def test_failures_jobs_and_provenance(served: tuple[httpx.Client, Path]) -> None:
    client, _ = served
    f = client.get("/api/runs/toy/bad/failures").json()
    assert f["failed"] == 2 and f["groups"][0]["error_line"] == "ValueError: bad detector"
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
    r = client.get("/api/runs/toy/ok/provenance", params={"dataset": "coadd:tract=x"})
    assert r.status_code == 400 and "expected TYPE:dim=int" in r.json()["detail"]
    assert client.get("/api/runs/nosuch/run").status_code == 404
    assert client.get("/api/runs/..%2Felsewhere%2Fsubmit%2Fother%2Frun").status_code == 404
    assert client.get("/api/runs/toy/ok/provenance", params={"dataset": "x", "lineage": "sideways"}).status_code == 422


def test_dashboard_shows_every_run(served: tuple[httpx.Client, Path]) -> None:
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "toy/ok" in page.text and "toy/bad" in page.text and "6/6 jobs succeeded" in page.text
