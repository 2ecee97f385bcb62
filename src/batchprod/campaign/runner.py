"""The campaign dispatcher (``batchprod campaign run``): every running campaign's ready jobs on the
catalog's sites, in one engine loop.

Once per control interval it reads the campaigns (an operator's start, pause, resume, cancel,
reprioritize or gate release takes effect there, from any process) and acts:

* a step whose dependencies are met (done, or the step's declared ``fraction`` of their jobs
  succeeded) and whose gate, if any, was released starts: its submit configs are prepared into runs
  in the central database and join the loop, with the campaign's priority, fair-share group and
  share, the step's site pins and exclusions, and the campaign's ``onSiteDown`` policy;
* a paused campaign's runs start nothing new (their running jobs finish); a cancelled one's are stopped;
* runs that ended are closed (outputs ingested, state recorded); a step whose runs all ended is done
  or failed, a campaign whose steps all ended is done or failed;
* progress is written to ``campaign_run``, site states (with their evidence) to ``site_state``;
  failed jobs (grouped by their failure signature), sites down or degraded and steps stuck become
  incidents, sent to the configured hooks.

Between control rounds the engine's dispatcher runs at full speed; nothing here is per job.
Stopping the dispatcher (SIGTERM, Ctrl-C) stops its attempts but not the campaigns: the next
``campaign run`` recovers their runs and goes on.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from batchprod._gc import long_lived
from batchprod.campaign import db as cdb
from batchprod.campaign.db import CampaignDB
from batchprod.campaign.spec import CampaignSpec, parse
from batchprod.config.safe_yaml import one_line
from batchprod.engine.dag import RunDag
from batchprod.engine.dispatcher import Clock, Site
from batchprod.engine.health import HealthPolicy, SiteState
from batchprod.engine.orchestrator import STATE_WRITE_ERRORS, Engine
from batchprod.errors import BatchprodError
from batchprod.execution.logs import signature
from batchprod.execution.states import JobState, RunState
from batchprod.state.database import using_db
from batchprod.state.run import Run

FINAL_RUN = (RunState.SUCCEEDED.value, RunState.FAILED.value, RunState.CANCELLED.value, cdb.NOT_PREPARED)


@dataclass
class Live:
    """A campaign run the loop drives."""

    campaign: str
    cid: int
    row: int  # campaign_run id
    run: Run
    dag: RunDag
    step: int  # step id


@dataclass
class _Stuck:
    done: int = -1
    since: float = 0.0
    raised: bool = False


@dataclass
class CampaignRunner:
    db: CampaignDB
    sites: Sequence[Site]
    clock: Clock = field(default_factory=Clock)
    poll: float = 0.005
    control_interval: float = 1.0
    policy: HealthPolicy | None = None
    hooks: Any = None  # where incidents go: ``notify(id)``, ``close(timeout)`` (campaign.hooks.IncidentHooks)
    events: Any = None  # an events.EventLog: the ops_event rows are exported there, in order
    #: prepare(config path) -> Run; the real one by default (the simulator gives its own)
    prepare: Callable[[str], Run] | None = None
    log: Callable[[str], None] = lambda _line: None
    #: the site catalog file: re-read when it changes (``sites add-downtime`` while this runs), for
    #: what can change under a running site (downtimes, weight, opportunistic)
    catalog_path: Path | None = None

    def __post_init__(self) -> None:
        self.engine = Engine(self.sites, self.clock, self.poll, self.policy)
        d = self.engine.dispatcher
        d.on_state = self._on_state
        d.on_failed = self._on_failed
        self.live: dict[str, Live] = {}
        self._failed: dict[tuple[str, str], list[str]] = defaultdict(list)  # (campaign, signature) -> jobs
        self._stuck: dict[int, _Stuck] = {}
        self._event_id: int | None = None  # the last event exported to the events file
        self._settled: set[int] = set()  # cancelled campaigns whose steps and runs are recorded so
        self._specs: dict[int, tuple[str, CampaignSpec]] = {}
        self._stop: str | None = None
        self._site_names = [s.name for s in self.sites]
        self.stats: Counter[str] = Counter()
        self._catalog_stamp = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.catalog_path.stat() if self.catalog_path is not None else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st is not None else None

    def _reread_catalog(self) -> None:
        """A catalog that changed on disk: its sites' downtimes, weights and opportunistic flags take
        effect at once; a site added or removed, or other settings, need the dispatcher restarted. A
        catalog that no longer loads is said once and the one in use is kept."""
        stamp = self._stamp()
        if stamp is None or stamp == self._catalog_stamp:
            return
        self._catalog_stamp = stamp
        from batchprod.campaign.sites import load_catalog

        assert self.catalog_path is not None
        try:
            cat = load_catalog(self.catalog_path)
        except BatchprodError as exc:
            self.log(f"site catalog changed but not taken: {exc} (the one read before stays in use)")
            return
        for site in self.sites:
            if site.name in cat.sites:
                cat[site.name].apply_to(site)
        added = sorted(set(cat.sites) - set(self._site_names))
        gone = sorted(set(self._site_names) - set(cat.sites))
        self.log(f"site catalog re-read from {self.catalog_path}: downtimes, weights and opportunistic flags in effect"
                 + (f"; sites added ({', '.join(added)}) or removed ({', '.join(gone)}) take effect when the "
                    "dispatcher is restarted" if added or gone else ""))

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, forever: bool = False, stop: Callable[[], str | None] = lambda: None) -> None:
        """Dispatch until no campaign has work left (``forever``: until stopped)."""
        with using_db(self.db.url), long_lived():  # runs prepared here go into the campaigns' database
            self._run(forever, stop)

    def _run(self, forever: bool, stop: Callable[[], str | None]) -> None:
        main = threading.current_thread() is threading.main_thread()  # (signals only there: serve, tests)
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)} if main else {}
        d = self.engine.dispatcher
        last = -float("inf")
        try:
            while True:
                why = self._stop or stop()
                if why:
                    self.log(f"stopping ({why}): attempts stopped, campaigns kept; 'batchprod campaign run' goes on")
                    d.cancel_all(why)
                    self._closed(interrupted=True)
                    break
                now = self.clock.monotonic()
                if now - last >= self.control_interval:
                    last = now
                    busy = self.control()
                    if not busy and not self.live and not forever:
                        break
                if not self.live:
                    self.clock.sleep(max(0.0, last + self.control_interval - self.clock.monotonic()))
                    continue
                if not d.tick() and d.dags:
                    d.wait()
                self._closed()
        except STATE_WRITE_ERRORS as exc:
            self.engine.disk_stop(exc, [lv.run for lv in self.live.values()])
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self._flush_failures()
            self._write_sites(self.clock.time())
            self._export_events()
            self.engine.close_backends()
            self.engine.release_all()
            if self.hooks is not None:
                self.hooks.close(10.0)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop = signal.Signals(signum).name

    # -- control ------------------------------------------------------------------------------------
    def control(self) -> bool:
        """One control round; True while any campaign is running or paused."""
        self._reread_catalog()
        now = self.clock.time()
        busy = False
        active = self.db.campaigns(states=(cdb.RUNNING, cdb.PAUSED, cdb.CANCELLED))
        cancelled = [c for c in active if c["state"] == cdb.CANCELLED]
        # (a cancelled campaign is listed until its runs are closed: only those with live runs matter)
        live = {lv.cid for lv in self.live.values()}
        steps, runs = self.db.steps_and_runs([c["id"] for c in active if c["state"] != cdb.CANCELLED])
        for c in cancelled:
            if c["id"] in live or c["id"] not in self._settled:
                self._cancel(c)
        for c in active:
            if c["state"] != cdb.CANCELLED:
                busy = True
                self._drive(c, now, steps[c["id"]], runs[c["id"]])
        self._flush_failures()
        self._write_sites(now)
        self._export_events()
        return busy

    def _export_events(self) -> None:
        if self.events is None:
            return
        if self._event_id is None:
            self._event_id = self.events.last_id()
        while rows := self.db.events(since_id=self._event_id, limit=5000):
            for row in rows:
                self.events.write(row)
            self._event_id = rows[-1]["id"]

    def _cancel(self, c: dict[str, Any]) -> None:
        for lv in self.live.values():
            if lv.cid == c["id"] and not lv.dag.stopping:
                self.engine.dispatcher.cancel(lv.dag, f"campaign {c['name']} cancelled")
        if any(lv.cid == c["id"] for lv in self.live.values()):
            return
        self._settled.add(c["id"])
        now = self.clock.time()
        for st in self.db.steps(c["id"]):
            if st["state"] not in (cdb.DONE, cdb.FAILED, cdb.CANCELLED):
                self.db.set_step(st, c["name"], now, state=cdb.CANCELLED, ended=now, message="campaign cancelled")
        rows = [{"id": r["id"], "state": RunState.CANCELLED.value, "event": (self._run_name(c, r), "cancelled")}
                for r in self.db.runs(c["id"]) if r["state"] not in FINAL_RUN]
        self.db.set_runs(rows, now)

    def _drive(self, c: dict[str, Any], now: float, steps: list[dict[str, Any]], runs: list[dict[str, Any]]) -> None:
        spec = self._spec(c)
        paused = c["state"] == cdb.PAUSED
        by_step: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for r in runs:
            by_step[r["step_id"]].append(r)
        # live runs: their campaign's current priority, share and pause; their progress
        updates = []
        for r in runs:
            lv = self.live.get(r["submit_dir"] or "")
            if lv is not None:
                dag = lv.dag
                dag.priority, dag.share, dag.paused = c["priority"], c["share"], paused
                counts = dag.counts()
                done = counts.get(JobState.SUCCEEDED.value, 0)
                failed = counts.get(JobState.FAILED.value, 0) + counts.get(JobState.UNREADY.value, 0)
                if (done, failed) != (r["done"], r["failed"]):
                    updates.append({"id": r["id"], "done": done, "failed": failed})
                    r["done"], r["failed"] = done, failed
            elif r["submit_dir"] and r["state"] not in FINAL_RUN:
                self._reopen(c, spec, steps, r)  # a run of a dispatcher that stopped: recover it
        self.db.set_runs(updates, now)
        state = {st["name"]: st for st in steps}
        for i, st in enumerate(steps):
            mine = by_step[st["id"]]
            if st["state"] == cdb.RUNNING:
                self._step_progress(c, spec, st, mine, now)
            elif st["state"] in (cdb.WAITING, cdb.GATED):
                deps = [state[d] for d in spec.after(i)]
                blocked = [d["name"] for d in deps if d["state"] in (cdb.FAILED, cdb.CANCELLED)]
                if blocked:  # (a gate waiting on a failed step would wait for ever)
                    self.db.set_step(st, c["name"], now, state=cdb.CANCELLED, ended=now,
                                     message=f"not started: step {blocked[0]} {state[blocked[0]]['state']}")
                    st["state"] = cdb.CANCELLED
                elif st["state"] == cdb.WAITING and not paused and self._deps_met(spec.steps[i].fraction, deps,
                                                                                 by_step):
                    self._start_step(c, spec, i, st, mine, now)
        self._campaign_end(c, steps, now)

    def _spec(self, c: dict[str, Any]) -> CampaignSpec:
        known = self._specs.get(c["id"])
        if known is None or known[0] != c["spec"]:
            known = self._specs[c["id"]] = (c["spec"], parse(c["spec"]))
        return known[1]

    @staticmethod
    def _deps_met(fraction: float, deps: list[dict[str, Any]], by_step: dict[int, list[dict[str, Any]]]) -> bool:
        if all(d["state"] == cdb.DONE for d in deps):
            return True
        if fraction >= 1.0 or any(d["state"] != cdb.RUNNING and d["state"] != cdb.DONE for d in deps):
            return False
        for d in deps:
            rows = by_step[d["id"]]
            total = sum(r["n_jobs"] or 0 for r in rows)
            if any(not r["submit_dir"] for r in rows) or not total:
                return False
            if sum(r["done"] or 0 for r in rows) / total < fraction:
                return False
        return True

    def _allowed(self, spec: CampaignSpec, i: int) -> frozenset[str] | None:
        step = spec.steps[i]
        if step.sites is None and not step.exclude:
            return None
        return frozenset(step.sites if step.sites is not None else self._site_names) - set(step.exclude)

    def _start_step(self, c: dict[str, Any], spec: CampaignSpec, i: int, st: dict[str, Any],
                    rows: list[dict[str, Any]], now: float) -> None:
        allowed = self._allowed(spec, i)
        unknown = sorted((set(spec.steps[i].sites or ()) | set(spec.steps[i].exclude)) - set(self._site_names))
        if unknown or (allowed is not None and not allowed):
            why = (f"site(s) {', '.join(unknown)} not in the site catalog" if unknown
                   else "its pins and exclusions leave no site of the catalog")
            self.db.set_step(st, c["name"], now, state=cdb.FAILED, started=now, ended=now, message=why)
            self._incident("step_failed", f"step {st['name']}: {why}", c["name"], None, why, [st["name"]], now)
            return
        self.db.set_step(st, c["name"], now, state=cdb.RUNNING, started=now)
        st["state"] = cdb.RUNNING
        self.log(f"campaign {c['name']}: step {st['name']} starts ({len(rows)} run{'s' if len(rows) != 1 else ''})")
        for r in rows:
            if r["state"] != cdb.PLANNED:
                continue
            try:
                run = self.prepare(r["config"]) if self.prepare else _prepare(r["config"])
            except BatchprodError as exc:
                msg = str(exc)
                self.db.set_runs([{"id": r["id"], "state": cdb.NOT_PREPARED, "message": msg,
                                   "event": (f"{c['name']}/{st['name']}/{r['config']}", cdb.NOT_PREPARED)}], now)
                r["state"] = cdb.NOT_PREPARED
                self._incident("step_failed", f"run not prepared: {one_line(msg, 300)}", c["name"], None, msg,
                               [r["config"]], now)
                continue
            r["submit_dir"] = str(run.submit_dir)
            self.db.set_runs([{"id": r["id"], "submit_dir": r["submit_dir"], "state": RunState.RUNNING.value,
                               "n_jobs": len(run.workflow) + (1 if run.workflow.final else 0), "done": 0, "failed": 0,
                               "event": (f"{c['name']}/{run.name}", RunState.RUNNING.value)}], now)
            self._join(c, spec, i, r, run)

    def _reopen(self, c: dict[str, Any], spec: CampaignSpec, steps: list[dict[str, Any]], r: dict[str, Any]) -> None:
        i = next(k for k, st in enumerate(steps) if st["id"] == r["step_id"])
        try:
            run = Run(r["submit_dir"])
            self._join(c, spec, i, r, run)
        except BatchprodError as exc:
            self.log(f"campaign {c['name']}: run {r['submit_dir']} not resumed: {exc}")

    def _join(self, c: dict[str, Any], spec: CampaignSpec, i: int, r: dict[str, Any], run: Run) -> None:
        dag = self.engine.open_run(run)
        dag.group = c["name"]
        dag.priority, dag.share = c["priority"], c["share"]
        dag.paused = c["state"] == cdb.PAUSED
        dag.sites = self._allowed(spec, i)
        dag.on_site_down = spec.on_site_down
        self.live[dag.key] = Live(c["name"], c["id"], r["id"], run, dag, r["step_id"])

    def _step_progress(self, c: dict[str, Any], spec: CampaignSpec, st: dict[str, Any],
                       rows: list[dict[str, Any]], now: float) -> None:
        if all(r["state"] in FINAL_RUN for r in rows):
            ok = all(r["state"] == RunState.SUCCEEDED.value for r in rows)
            bad = [r for r in rows if r["state"] != RunState.SUCCEEDED.value]
            msg = None if ok else f"{len(bad)} of {len(rows)} runs {bad[0]['state']}: {bad[0]['message'] or ''}".strip()
            self.db.set_step(st, c["name"], now, state=cdb.DONE if ok else cdb.FAILED, ended=now, message=msg)
            st["state"], st["message"] = cdb.DONE if ok else cdb.FAILED, msg
            self._stuck.pop(st["id"], None)
            return
        done = sum(r["done"] or 0 for r in rows)
        s = self._stuck.setdefault(st["id"], _Stuck(done, now))
        if done != s.done:
            s.done, s.since, s.raised = done, now, False
        elif not s.raised and now - s.since >= spec.stuck_after:
            s.raised = True
            why = f"no job of step {st['name']} finished for {now - s.since:.0f} s ({done} done)"
            self._incident("step_stuck", f"step {st['name']} stuck", c["name"], None, why, [st["name"]], now)

    def _campaign_end(self, c: dict[str, Any], steps: list[dict[str, Any]], now: float) -> None:
        states = [st["state"] for st in steps]
        if any(s in (cdb.RUNNING, cdb.WAITING, cdb.GATED) for s in states):
            return  # (a step waiting on a failed one is cancelled next round, then this ends)
        if all(s == cdb.DONE for s in states):
            self.db.set_campaign(c["id"], now, state=cdb.DONE, message=f"{len(steps)} steps done")
            self.log(f"campaign {c['name']}: done")
        else:
            bad = [st for st in steps if st["state"] == cdb.FAILED]
            msg = f"step {bad[0]['name']} failed: {bad[0]['message']}" if bad else "steps cancelled"
            self.db.set_campaign(c["id"], now, state=cdb.FAILED, message=msg)
            self.log(f"campaign {c['name']}: failed ({msg})")

    def _closed(self, interrupted: bool = False) -> None:
        """Close the runs the dispatcher retired; record their end on the campaign."""
        d = self.engine.dispatcher
        ended = [k for k in self.live if k in d.results]
        if not ended:
            return
        now = self.clock.time()
        rows = []
        for key in ended:
            lv = self.live.pop(key)
            state = d.results.pop(key)
            if interrupted:  # the campaign goes on at the next 'campaign run', which recovers the run
                self.engine.close_run(lv.run, RunState.INTERRUPTED)
                continue
            message = self.engine.close_run(lv.run, state)
            counts = lv.dag.counts()
            failed = counts.get(JobState.FAILED.value, 0)
            msg = message if state == RunState.SUCCEEDED else (
                f"{failed:,} job{'s' if failed != 1 else ''} failed" if failed else f"{state.value.lower()}")
            rows.append({"id": lv.row, "state": state.value, "message": msg,
                         "done": counts.get(JobState.SUCCEEDED.value, 0), "failed": failed,
                         "event": (f"{lv.campaign}/{lv.run.name}", state.value)})
        self.db.set_runs(rows, now)

    @staticmethod
    def _run_name(c: dict[str, Any], r: dict[str, Any]) -> str:
        return f"{c['name']}/{r['submit_dir'] or r['config']}"

    # -- sites and incidents ------------------------------------------------------------------------
    def _on_state(self, site: Site) -> None:
        h = site.health
        now = self.clock.time()
        self.log(f"site {site.name}: {h.state} ({h.evidence})")
        self.db.set_site(site.name, h.state.value, h.since, h.evidence, self._site_stats(site), True, now)
        if h.state == SiteState.DOWN and not h.scheduled:
            affected = sorted({lv.campaign for lv in self.live.values()})
            self._incident("site_down", f"site {site.name} down", "", site.name, h.evidence, affected, now)
        elif h.state == SiteState.DEGRADED:
            self._incident("site_degraded", f"site {site.name} degraded", "", site.name, h.evidence, [], now)
        elif h.state == SiteState.ONLINE:
            for kind in ("site_down", "site_degraded"):
                self.db.resolve_incidents(kind, site.name, now, f"site {site.name} online: {h.evidence}")

    def _on_failed(self, dag: RunDag, j: int) -> None:
        lv = self.live.get(dag.key)
        campaign = lv.campaign if lv else ""
        cause = dag.extra[j].get("cause") or dag.extra[j].get("message") or "failed"
        key = (campaign, signature(str(cause)))
        self._failed[key].append(f"{dag.run.name}:{dag.name(j)}")

    def _flush_failures(self) -> None:
        """Failed jobs since the last round, one incident per (campaign, signature)."""
        if not self._failed:
            return
        now = self.clock.time()
        for (campaign, sig), jobs in self._failed.items():
            self._incident("job_failed", sig, campaign, None, f"{len(jobs)} more jobs failed for good: {sig}",
                           jobs, now, count=len(jobs))
        self._failed.clear()

    def _incident(self, kind: str, sig: str, campaign: str, site: str | None, evidence: str, affected: list[str],
                  now: float, count: int = 1) -> None:
        iid, new = self.db.raise_incident(kind, sig, campaign, site, evidence, affected, now, count)
        self.stats[f"incident_{kind}"] += count
        if new and self.hooks is not None:
            self.hooks.notify(iid)

    def _site_stats(self, site: Site) -> dict[str, Any]:
        skips = {reason: n for (name, reason), n in self.engine.dispatcher.skips.items() if name == site.name}
        return {"running": site.jobs, "cores_used": site.used_cores, "started": site.started_total,
                "ended": site.ended_total, "failed": site.failed_total, "preempted": site.preempted,
                "fault_rate": round(site.health.fault_rate(), 3), "skips": skips}

    def _write_sites(self, now: float) -> None:
        for site in self.sites:
            h = site.health
            with contextlib.suppress(DBAPIError):
                self.db.set_site(site.name, h.state.value, h.since, h.evidence, self._site_stats(site), False, now)


def _prepare(config: str) -> Run:
    from batchprod.engine.prepare import prepare

    return prepare(config)
