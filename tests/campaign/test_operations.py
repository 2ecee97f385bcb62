"""What operators get: failed jobs grouped into one incident sent to a real HTTP hook, the event log,
status, the service dispatching campaigns (a real HTTP server, /api and /metrics), and the simulator."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.events import EventLog
from batchprod.campaign.hooks import IncidentHooks
from batchprod.campaign.testing import Toy, create, runner
from batchprod.testing import wait_for


class Hook:
    """A real HTTP server recording the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        seen = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                n = int(self.headers.get("Content-Length", 0))
                seen.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/incidents"

    def close(self) -> None:
        self.server.shutdown()


def test_identical_failures_are_one_incident_sent_to_the_hook(central: str, toy: Toy, tmp_path: Path, cli) -> None:
    bad = toy.config("bad", "echo reading refcat; echo saturated reference star catalog near visit {visit} "
                            "detector {detector} >&2; exit 5", numberOfRetries=0)
    cat = toy.sites({"one": {"cores": 4}})
    create(central, toy.campaign("f", [{"name": "s", "submit": [bad]},
                                       {"name": "t", "gate": True, "submit": [toy.config("b")]}]))
    hook = Hook()
    db = CampaignDB(central)
    try:
        r = runner(central, cat, hooks=IncidentHooks(db, urls=[hook.url], backoff=0.05),
                   events=EventLog(tmp_path / "events.jsonl"))
        r.run()
    finally:
        hook.close()
    (inc,) = [i for i in db.incidents() if i["kind"] == "job_failed"]
    assert inc["count"] == 16 and inc["campaign"] == "f" and "saturated reference star catalog" in inc["signature"]
    assert len(inc["affected"]) == 16 and inc["delivered"] == 1
    posted = [b for b in hook.bodies if b["kind"] == "job_failed"]
    assert len(posted) == 1 and posted[0]["signature"] == inc["signature"] and posted[0]["source"] == "batchprod"
    assert db.get("f")["state"] == "failed" and "step s failed" in db.get("f")["message"]
    steps = {s["name"]: s["state"] for s in db.steps(db.get("f")["id"])}
    assert steps == {"s": "failed", "t": "cancelled"}  # never started on a failed step, gate or not
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["id"] for e in lines] == [e["id"] for e in db.events()]  # every row once, in order
    seen = [(e["kind"], e["subject"], e["state"]) for e in lines]
    assert seen[:2] == [("campaign", "f", "planned"), ("campaign", "f", "running")]  # made by the commands
    assert ("campaign", "f", "failed") in seen
    assert any(e["kind"] == "incident" and e["state"] == "open" for e in lines)
    r = cli("incidents")
    assert r.exit_code == 0 and "saturated reference star catalog" in r.output and "16" in r.output, r.output
    assert cli("incidents", "--resolve", inc["id"]).exit_code == 0
    assert db.incident(inc["id"])["state"] == "resolved"
    r = cli("incidents", "--resolve", inc["id"])
    assert r.exit_code == 2 and "already resolved" in r.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (our own local server)
        body = resp.read().decode()
    return json.loads(body) if body.startswith(("{", "[")) else body


def test_serve_dispatches_campaigns_and_reports_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvicorn")
    toy = Toy(tmp_path / "t", visits=2)
    url = f"sqlite:///{tmp_path / 'central.db'}"
    cat = toy.sites({"here": {"cores": 2}})
    path = toy.campaign("svc", [{"name": "s", "submit": [toy.config("a")]}])
    env = dict(os.environ, BATCHPROD_DB=url)
    cmd = [sys.executable, "-m", "batchprod.cli"]
    assert subprocess.run([*cmd, "campaign", "create", str(path), "--start"], env=env, capture_output=True).returncode == 0
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    srv = subprocess.Popen([*cmd, "serve", "--port", str(port), "--root", str(toy.root / "submit"), "--dispatch",
                            str(cat)], env=env, stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        def done() -> bool:
            try:
                return _get(f"{base}/api/campaigns/svc")["state"] == "done"
            except OSError:
                return False

        wait_for(done, timeout=90, interval=0.3)
        status = _get(f"{base}/api/campaigns/svc")
        assert status["steps"][0]["done"] == 8 and status["sites"][0]["site"] == "here"
        assert [c["name"] for c in _get(f"{base}/api/campaigns")] == ["svc"]
        (site,) = _get(f"{base}/api/sites")
        assert site["state"] == "online" and "T" in site["since"] and "T" in site["updated"]  # ISO times, as /api/runs
        metrics = _get(f"{base}/metrics")
        assert 'batchprod_campaigns{state="done"} 1.0' in metrics
        assert 'batchprod_site_state{site="here",state="online"} 1.0' in metrics
        assert 'batchprod_jobs{campaign="svc",state="SUCCEEDED"} 8.0' in metrics
    finally:
        srv.terminate()
        srv.wait(30)
        log.close()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()


def test_simulation_reports_makespan_priorities_and_outages(tmp_path: Path, cli) -> None:
    toy = Toy(tmp_path / "t", visits=2)
    cat = toy.sites({"big": {"cores": 8}, "small": {"cores": 2, "opportunistic": True}})
    sim = {"defaultDuration": 100, "jobs": {"s": 400}, "sample": 60, "preemptionRate": 0.1,
           "outages": [{"site": "big", "start": 300, "end": 1500}]}
    path = toy.campaign("sim", [{"name": "s", "submit": [toy.config("a")]}], simulation=sim)
    t = time.monotonic()
    r = cli("campaign", "simulate", path, cat, "--json", "--plot", tmp_path / "sim.png")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert time.monotonic() - t < 60
    assert out["campaigns"][0]["state"] == "done" and out["makespan_s"] > 0
    sites = {s["site"]: s for s in out["sites"]}
    assert sites["small"]["preempted"] > 0 and sites["big"]["started"] > 0
    assert max(s["peak_cores"] for s in out["sites"]) <= 8
    states = [(e["site"], e["state"]) for e in out["site_events"]]
    assert ("big", "down") in states and ("big", "online") in states  # noticed on its own, and back
    assert (tmp_path / "sim.png").stat().st_size > 10_000
    assert not (toy.root / "submit").exists()  # nothing of the campaign's was touched
    r = cli("campaign", "simulate", path, cat, "--plot", tmp_path / "nowhere" / "sim.png")
    assert r.exit_code == 2 and "no such directory" in r.output and "Traceback" not in r.output


def test_a_simulation_with_outages_gives_the_same_result_at_any_start(tmp_path: Path) -> None:
    """Outages, failures and preemptions over real prepared runs, started at different fractions of a
    second: one result (virtual time starts on a whole second)."""
    from batchprod.campaign.simulate import simulate
    from batchprod.campaign.sites import load_catalog
    from batchprod.campaign.spec import load_campaign

    toy = Toy(tmp_path / "t", visits=4, detectors=16)
    sites = tmp_path / "sites.yaml"  # (in this order: the sites' order is part of the scenario)
    sites.write_text("sites:\n  small: {cores: 1, memory: 2GB}\n  big: {cores: 2, memory: 4GB, weight: 2.0}\n"
                     "  opp: {cores: 1, memory: 1GB, opportunistic: true}\n")
    cat = load_catalog(sites)
    keys = {"requestWalltime": "00:10:00"}
    sim = {"defaultDuration": 60, "durations": {"work": 120}, "jitter": 0.2, "failureRate": 0.05,
           "preemptionRate": 0.1, "outages": [{"site": "big", "start": 300, "end": 900}], "sample": 60}
    path = toy.campaign("o", [{"name": "s1", "submit": [toy.config("p1", **keys), toy.config("p2", **keys)]},
                              {"name": "s2", "submit": [toy.config("q1", **keys)]}], simulation=sim)
    spec = load_campaign(path)
    base = 1_790_000_000.0
    results = [simulate(spec, cat, start=base + f).to_json() for f in (0.0, 0.37, 0.61, 0.89)]
    keys = ("makespan_s", "assignments", "campaigns", "sites")
    assert all({k: r[k] for k in keys} == {k: results[0][k] for k in keys} for r in results[1:])


def test_simulation_shows_priorities(tmp_path: Path) -> None:
    from batchprod.campaign.simulate import simulate
    from batchprod.campaign.sites import load_catalog
    from batchprod.campaign.spec import CampaignSpec

    toy = Toy(tmp_path / "t", visits=1)
    cat = load_catalog(toy.sites({"only": {"cores": 10}}))
    specs = [CampaignSpec.model_validate({"campaign": f"p{p}", "priority": p, "steps": [
        {"name": "s", "submit": [f"x{p}.yaml"]}, {"name": "g", "gate": True, "submit": [f"y{p}.yaml"]}],
        "simulation": {"defaultDuration": 10, "jobs": {"s": 200, "g": 20}, "sample": 5, "failureRate": 0.05}})
        for p in (1, 5)]
    res = simulate(specs[0], cat, extra=specs[1:])
    done = {c["campaign"]: c["finished_s"] for c in res.campaigns}
    assert done["p5"] < done["p1"]  # the higher priority finishes first on shared sites
    again = simulate(specs[0], cat, extra=specs[1:])  # (gates open themselves in a simulation)
    assert again.to_json()["campaigns"] == res.to_json()["campaigns"]  # the same simulation, the same result
    assert [s["started"] for s in again.sites] == [s["started"] for s in res.sites]


def test_a_step_without_progress_is_a_stuck_incident(tmp_path: Path) -> None:
    toy = Toy(tmp_path / "t", visits=1, detectors=2)
    url = f"sqlite:///{tmp_path / 'central.db'}"
    cat = toy.sites({"one": {"cores": 2}})
    create(url, toy.campaign("slow", [{"name": "s", "submit": [toy.config("a", "sleep 2.5; cat {inputs.raw} > "
                                                                               "{outputs.calexp}")]}],
                             stuckAfter="1s"))
    runner(url, cat).run()
    db = CampaignDB(url)
    (inc,) = [i for i in db.incidents() if i["kind"] == "step_stuck"]
    assert inc["campaign"] == "slow" and "no job of step s finished" in inc["evidence"]
    assert db.get("slow")["state"] == "done"  # an incident, not a failure


def test_simulation_learns_durations_and_failures_from_a_finished_run(tmp_path: Path) -> None:
    from batchprod.campaign.simulate import history_settings, sim_settings
    from batchprod.campaign.spec import CampaignSpec
    from batchprod.engine.control import LocalExecutor
    from batchprod.engine.prepare import prepare

    toy = Toy(tmp_path / "t", visits=1, detectors=4)
    run = prepare(toy.config("h", "sleep 0.3; test {detector} != 3 || exit 4; cat {inputs.raw} > {outputs.calexp}",
                             numberOfRetries=0))
    LocalExecutor(run).execute()
    spec = CampaignSpec.model_validate({"campaign": "h", "steps": [{"name": "s", "submit": ["x"]}],
                                        "simulation": {"defaultDuration": 99}})
    s = history_settings(sim_settings(spec, "h.yaml"), [run])
    assert 0.3 <= s.durations["work"] < 5 and s.failure_rate["work"] == pytest.approx(0.25)
