"""Incident hooks: delivery to a real HTTP server and a real command, retries, redaction, never blocking."""

from __future__ import annotations

import base64
import json
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.hooks import IncidentHooks, incident_payload
from batchprod.errors import ConfigError

NOW = 1_780_000_000.5


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """A real HTTP server on 127.0.0.1: answers ``script`` in order, then ``status``; waits ``hang``
    seconds (or until the test ends) before answering."""

    port: int = 0
    script: list[int] = field(default_factory=list)
    status: int = 200
    hang: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answer(self, seen: Seen) -> tuple[int, float]:
        with self.lock:
            self.seen.append(seen)
            return self.script.pop(0) if self.script else self.status, self.hang


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status, hang = srv.answer(Seen(self.path, dict(self.headers.items()), body))
            if hang:
                srv.release.wait(hang)
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def db(tmp_path: Path) -> Iterator[CampaignDB]:
    d = CampaignDB(f"sqlite:///{tmp_path}/c.db")
    yield d
    d.close()


def incident(db: CampaignDB, signature: str = "exit 139: segfault in calibrate", count: int = 3) -> int:
    iid, new = db.raise_incident("job_failed", signature, "survey", "cluster", "3 jobs exited 139",
                                 ["survey/run1/job7", "survey/run1/job9"], now=NOW, count=count)
    assert new
    return iid


def test_an_incident_arrives_as_json(db: CampaignDB, server: Server) -> None:
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[server.url])
    hooks.notify(iid)
    assert hooks.close(10)

    assert len(server.seen) == 1
    seen = server.seen[0]
    assert seen.path == "/hook"
    assert seen.headers["Content-Type"] == "application/json"
    body = json.loads(seen.body)
    assert body["id"] == iid
    assert (body["kind"], body["signature"], body["count"]) == ("job_failed", "exit 139: segfault in calibrate", 3)
    assert body["source"] == "batchprod"
    assert body["first"] == body["last"] == datetime.fromtimestamp(NOW, UTC).isoformat()
    assert body["first_epoch"] == body["last_epoch"] == NOW
    assert body["affected"] == ["survey/run1/job7", "survey/run1/job9"]
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 1 and rec["hook_error"] is None


def test_payload_times_are_iso_8601_utc() -> None:
    out = incident_payload({"id": 1, "first": 0.0, "last": 86400.0})
    assert out == {"id": 1, "first": "1970-01-01T00:00:00+00:00", "last": "1970-01-02T00:00:00+00:00",
                   "first_epoch": 0.0, "last_epoch": 86400.0, "source": "batchprod"}


@pytest.mark.parametrize("status", [503, 500, 429])
def test_server_errors_are_retried_until_it_takes_it(db: CampaignDB, server: Server, status: int) -> None:
    server.script = [status, status, 200]
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[server.url], backoff=0.01)
    hooks.notify(iid)
    assert hooks.close(10)

    assert len(server.seen) == 3
    assert len({s.body for s in server.seen}) == 1  # the same JSON each time
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 1 and rec["hook_error"] is None


def test_a_client_error_is_not_retried_and_the_error_hides_the_secrets(
        db: CampaignDB, server: Server, capfd: pytest.CaptureFixture[str]) -> None:
    server.status = 404
    url = f"http://ops:s3cret-pw@127.0.0.1:{server.port}/hook?channel=ops&token=tok-abc123"
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[url], backoff=0.01)
    hooks.notify(iid)
    assert hooks.close(10)

    assert len(server.seen) == 1
    # user:password@ is sent as Basic authentication, not as part of the host
    auth = server.seen[0].headers["Authorization"]
    assert base64.b64decode(auth.removeprefix("Basic ")).decode() == "ops:s3cret-pw"
    assert server.seen[0].path == "/hook?channel=ops&token=tok-abc123"
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 0
    error = rec["hook_error"]
    assert error == (f"POST http://ops:***@127.0.0.1:{server.port}/hook?channel=***&token=***: "
                     "HTTP 404 Not Found, after 1 try")
    assert "s3cret" not in error and "tok-abc123" not in error
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "s3cret" not in out + err


def test_a_server_that_never_answers_is_retried_then_given_up(db: CampaignDB, server: Server) -> None:
    server.hang = 30.0  # released when the test ends
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[server.url], retries=3, backoff=0.01, timeout=0.3)
    hooks.notify(iid)
    assert hooks.close(20)

    assert len(server.seen) == 3
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 0
    assert rec["hook_error"] == f"POST {server.url}: no answer within 0.3 s, after 3 tries"


def test_a_closed_port_is_retried_then_given_up(db: CampaignDB) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[f"http://127.0.0.1:{port}/x"], retries=4, backoff=0.01, max_backoff=0.02)
    hooks.notify(iid)
    assert hooks.close(20)

    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 0
    assert rec["hook_error"].startswith(f"POST http://127.0.0.1:{port}/x: cannot connect: ")
    assert rec["hook_error"].endswith(", after 4 tries")


@pytest.mark.parametrize("as_string", [False, True])
def test_a_command_gets_the_incident_on_stdin(db: CampaignDB, tmp_path: Path, as_string: bool) -> None:
    out, env = tmp_path / "stdin.json", tmp_path / "env.txt"
    code = (f"import sys,json,os,pathlib; OUT={str(out)!r}; pathlib.Path(OUT).write_text(sys.stdin.read()); "
            f"pathlib.Path({str(env)!r}).write_text(os.environ['BATCHPROD_INCIDENT_ID'])")
    argv = [sys.executable, "-c", code]
    iid = incident(db)
    hooks = IncidentHooks(db, commands=[shlex.join(argv) if as_string else argv])
    hooks.notify(iid)
    assert hooks.close(20)

    body = json.loads(out.read_text())
    assert (body["id"], body["kind"], body["count"], body["source"]) == (iid, "job_failed", 3, "batchprod")
    assert env.read_text() == str(iid)
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 1 and rec["hook_error"] is None


def test_a_command_string_is_never_run_by_a_shell(db: CampaignDB, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    command = f"{shlex.quote(sys.executable)} -c pass ; touch {shlex.quote(str(marker))}"
    hooks = IncidentHooks(db, commands=[command])
    hooks.notify(incident(db))
    assert hooks.close(20)
    assert not marker.exists()  # ';' and 'touch' were arguments of python -c, not a second command


def test_a_failing_command_is_retried_then_given_up(db: CampaignDB, tmp_path: Path) -> None:
    tries = tmp_path / "tries"
    code = (f"import pathlib,sys; p=pathlib.Path({str(tries)!r}); p.write_text(p.read_text() + 'x' "
            f"if p.exists() else 'x'); sys.exit('disk full')")
    iid = incident(db)
    hooks = IncidentHooks(db, commands=[[sys.executable, "-c", code]], retries=2, backoff=0.01)
    hooks.notify(iid)
    assert hooks.close(20)

    assert tries.read_text() == "xx"
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 0
    assert rec["hook_error"] == f"command {sys.executable!r}: exit status 1 (disk full), after 2 tries"


def test_one_hook_failing_does_not_hide_the_other(db: CampaignDB, server: Server) -> None:
    iid = incident(db)
    hooks = IncidentHooks(db, commands=[[sys.executable, "-c", "import sys; sys.exit(3)"]], urls=[server.url],
                          retries=1)
    hooks.notify(iid)
    assert hooks.close(20)

    assert len(server.seen) == 1
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 1  # it reached someone
    assert rec["hook_error"] == f"command {sys.executable!r}: exit status 3, after 1 try"


def test_notify_returns_at_once_while_the_server_sleeps(db: CampaignDB, server: Server) -> None:
    server.hang = 2.0
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[server.url])
    t0 = time.monotonic()
    hooks.notify(iid)
    assert time.monotonic() - t0 < 0.05
    time.sleep(0.2)  # the POST is under way now: the server holds it for 2 s
    server.hang = 0.0
    t0 = time.monotonic()
    hooks.notify(iid)
    assert time.monotonic() - t0 < 0.05
    assert hooks.close(20)
    assert len(server.seen) == 2  # the second notify is a second delivery (the count may have grown)
    rec = db.incident(iid)
    assert rec is not None and rec["delivered"] == 2


def test_close_drains_the_queue(db: CampaignDB, server: Server) -> None:
    ids = [incident(db, f"signature {i}") for i in range(5)]
    hooks = IncidentHooks(db, urls=[server.url])
    for iid in ids:
        hooks.notify(iid)
    assert hooks.close(20)

    assert sorted(json.loads(s.body)["id"] for s in server.seen) == ids
    assert all((db.incident(i) or {})["delivered"] == 1 for i in ids)
    hooks.notify(ids[0])  # after close: ignored, no error
    assert hooks.close(1)


def test_close_gives_up_after_its_timeout(db: CampaignDB, server: Server) -> None:
    server.hang = 30.0  # released when the test ends
    iid = incident(db)
    hooks = IncidentHooks(db, urls=[server.url], timeout=5.0)
    hooks.notify(iid)
    t0 = time.monotonic()
    assert not hooks.close(0.2)
    assert time.monotonic() - t0 < 2.0
    server.release.set()  # the POST under way still ends, and is recorded
    deadline = time.monotonic() + 10
    while (db.incident(iid) or {})["delivered"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (db.incident(iid) or {})["delivered"] == 1


def test_no_hooks_and_unknown_incidents_are_no_ops(db: CampaignDB, server: Server) -> None:
    hooks = IncidentHooks(db)
    hooks.notify(incident(db))
    assert hooks.close(1)
    with IncidentHooks(db, urls=[server.url]) as hooks:
        hooks.notify(12345)
    assert server.seen == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"urls": ["ftp://u:pw-123@host/x"]}, "'ftp://u:***@host/x': not an http:// or https:// URL"),
    ({"urls": ["http://host:port/x"]}, "not an http:// or https:// URL"),
    ({"commands": [[]]}, "no program to run"),
    ({"commands": ["notify 'unbalanced"]}, "No closing quotation"),
    ({"urls": "http://host/x"}, "are lists"),
    ({"retries": 0}, "retries must be at least 1"),
])
def test_bad_configuration_is_one_line(db: CampaignDB, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        IncidentHooks(db, **kwargs)
    assert message in str(e.value)
    assert "pw-123" not in str(e.value)
