"""Prometheus metrics of the central database, for ``GET /metrics``.

Read at scrape time with a handful of GROUP BY queries (never one per job or attempt): the database
is the truth, so no process has to stay up to keep counters and every service instance says the
same. The counters are totals of the recorded attempts; they fall only if a run is deleted (which
Prometheus takes as a reset). Without a central database, or when it fails, a scrape still answers:
``batchprod_db_up 0`` and nothing else.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchprod.campaign import db as campaign_db
from batchprod.engine.health import SiteState
from batchprod.errors import BatchprodError
from batchprod.execution.states import JobState
from batchprod.state.database import redact, selected_db
from batchprod.state.store import (
    StateStore,
    attempt_t,
    campaign_run_t,
    campaign_t,
    incident_t,
    job_t,
    run_t,
    site_state_t,
)

log = logging.getLogger(__name__)

#: the window of ``batchprod_dispatch_rate`` (seconds)
DISPATCH_WINDOW = 60.0
#: attempt statuses of work in flight; every other status is an ended attempt
IN_FLIGHT = (JobState.QUEUED.value, JobState.RUNNING.value)
CAMPAIGN_STATES = (campaign_db.PLANNED, campaign_db.RUNNING, campaign_db.PAUSED, *campaign_db.FINAL)
SITE_STATES = tuple(s.value for s in SiteState)
JOB_STATES = tuple(s.value for s in JobState)


@dataclass
class Snapshot:
    """What one scrape read from the database (label values -> counts)."""

    jobs: Counter[tuple[str, str]] = field(default_factory=Counter)  # (campaign, job state)
    #: (campaign, site, QUEUED or RUNNING): where each campaign's work is now
    on_site: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    in_flight: Counter[str] = field(default_factory=Counter)  # site
    ended: Counter[tuple[str, str]] = field(default_factory=Counter)  # (site, outcome)
    failures: Counter[str] = field(default_factory=Counter)  # failure class
    started: Counter[str] = field(default_factory=Counter)  # site: attempts started in the window
    sites: dict[str, str] = field(default_factory=dict)  # site -> state
    incidents: Counter[str] = field(default_factory=Counter)  # kind: open ones
    campaigns: dict[str, str] = field(default_factory=dict)  # name -> state


def _campaign_of_runs() -> sa.Select[Any]:
    """(run id, campaign name or None) of every run; a run in several campaigns counts for the first."""
    cr = campaign_run_t.c
    owner = (sa.select(cr.submit_dir, sa.func.min(cr.campaign_id).label("campaign_id"))
             .where(cr.submit_dir.is_not(None)).group_by(cr.submit_dir).subquery("owner"))
    return (sa.select(run_t.c.id, campaign_t.c.name)
            .select_from(run_t.outerjoin(owner, owner.c.submit_dir == run_t.c.submit_dir)
                         .outerjoin(campaign_t, campaign_t.c.id == owner.c.campaign_id)))


def _jobs_query() -> sa.Select[Any]:
    """Jobs by (run, state), on the job table's (run_id, status) index: one row per run and state
    (runs are mapped to their campaigns with :func:`_campaign_of_runs`)."""
    return sa.select(job_t.c.run_id, job_t.c.status, sa.func.count()).group_by(job_t.c.run_id, job_t.c.status)


def _attempts_query(since: float) -> sa.Select[Any]:
    """Every attempt metric in one pass over the attempt table."""
    a = attempt_t.c
    recent = sa.func.sum(sa.case((a.start >= since, 1), else_=0))
    return sa.select(a.run_id, a.site, a.status, a.failure_class, sa.func.count(), recent).group_by(
        a.run_id, a.site, a.status, a.failure_class)


def read(conn: sa.Connection, now: float) -> Snapshot:
    """The snapshot, in six queries whatever the number of jobs."""
    snap = Snapshot()
    campaign_of = {rid: name or "" for rid, name in conn.execute(_campaign_of_runs())}
    for run_id, status, n in conn.execute(_jobs_query()):
        snap.jobs[(campaign_of.get(run_id, ""), status)] += int(n)
    for run_id, site, status, fclass, n, recent in conn.execute(_attempts_query(now - DISPATCH_WINDOW)):
        site, n = site or "", int(n)
        if status in IN_FLIGHT:
            snap.in_flight[site] += n
            snap.on_site[(campaign_of.get(run_id, ""), site, status)] += n
        else:
            outcome = "succeeded" if status == JobState.SUCCEEDED else (fclass or status.lower())
            snap.ended[(site, outcome)] += n
        if fclass:
            snap.failures[fclass] += n
        snap.started[site] += int(recent or 0)
    snap.sites = {name: state for name, state in conn.execute(sa.select(site_state_t.c.name, site_state_t.c.state))}
    i = incident_t.c
    for kind, n in conn.execute(sa.select(i.kind, sa.func.count()).where(i.state == "open").group_by(i.kind)):
        snap.incidents[kind] = int(n)
    snap.campaigns = {name: state for name, state in conn.execute(sa.select(campaign_t.c.name, campaign_t.c.state))}
    return snap


def _sorted(keys: Iterable[str]) -> list[str]:
    return sorted(set(keys))


def families(snap: Snapshot) -> Iterator[Metric]:
    """The metric families of a snapshot. Known label values are given as 0 rather than left out
    (every job state of every campaign, the running count and dispatch rate of every known site,
    every campaign state), so that a value falling to zero reads as 0, not as a gap."""
    jobs = GaugeMetricFamily("batchprod_jobs", "Jobs by state per campaign (campaign=\"\": runs in none).",
                             labels=["campaign", "state"])
    for campaign in _sorted([c for c, _ in snap.jobs] + list(snap.campaigns)):
        for state in _sorted([*JOB_STATES, *(s for c, s in snap.jobs if c == campaign)]):
            jobs.add_metric([campaign, state], snap.jobs.get((campaign, state), 0))
    yield jobs

    on_site = GaugeMetricFamily("batchprod_jobs_on_site",
                                "Jobs QUEUED or RUNNING per campaign and site (campaign=\"\": runs in none).",
                                labels=["campaign", "site", "state"])
    for (campaign, site, state), n in sorted(snap.on_site.items()):
        on_site.add_metric([campaign, site, state], n)
    yield on_site

    sites = _sorted([*snap.sites, *snap.in_flight, *snap.started])
    running = GaugeMetricFamily("batchprod_attempts_running", "Attempts RUNNING or QUEUED by site.",
                                labels=["site"])
    for site in sites:
        running.add_metric([site], snap.in_flight.get(site, 0))
    yield running

    ended = CounterMetricFamily("batchprod_attempts_total",
                                "Ended attempts by site and outcome (succeeded, or the failure class).",
                                labels=["site", "outcome"])
    for (site, outcome), n in sorted(snap.ended.items()):
        ended.add_metric([site, outcome], n)
    yield ended

    failures = CounterMetricFamily("batchprod_failures_total", "Failed attempts by failure class.",
                                   labels=["failure_class"])
    for fclass, n in sorted(snap.failures.items()):
        failures.add_metric([fclass], n)
    yield failures

    rate = GaugeMetricFamily("batchprod_dispatch_rate",
                             f"Attempts started per second by site over the last {DISPATCH_WINDOW:g} s.",
                             labels=["site"])
    for site in sites:
        rate.add_metric([site], snap.started.get(site, 0) / DISPATCH_WINDOW)
    yield rate

    site_state = GaugeMetricFamily("batchprod_site_state", "1 for the site's current state, 0 for the others.",
                                   labels=["site", "state"])
    for site, current in sorted(snap.sites.items()):
        for state in (*SITE_STATES, *([current] if current not in SITE_STATES else [])):
            site_state.add_metric([site, state], 1 if state == current else 0)
    yield site_state

    incidents = GaugeMetricFamily("batchprod_incidents_open", "Open incidents by kind.", labels=["kind"])
    for kind, n in sorted(snap.incidents.items()):
        incidents.add_metric([kind], n)
    yield incidents

    by_state = Counter(snap.campaigns.values())
    campaigns = GaugeMetricFamily("batchprod_campaigns", "Campaigns by state.", labels=["state"])
    for state in _sorted([*CAMPAIGN_STATES, *by_state]):
        campaigns.add_metric([state], by_state.get(state, 0))
    yield campaigns


class CentralDBCollector(Collector):
    """Reads the central database at each scrape: ``url``, else the one selected by ``--db`` /
    ``$BATCHPROD_DB`` then. The database is opened for the scrape and closed after it (a store's
    engine is shared with any other store of the URL open in the process)."""

    def __init__(self, url: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.clock = clock

    def snapshot(self) -> Snapshot | None:
        """The database's snapshot, or None (no central database, or it failed: logged in one line)."""
        url = self.url or selected_db()
        if not url:
            return None
        store: StateStore | None = None
        try:
            store = StateStore(url)  # checks (and if need be migrates) the schema, as every reader does
            with store.engine.connect() as conn:
                return read(conn, self.clock())
        except (BatchprodError, sa.exc.SQLAlchemyError, sqlite3.Error, OSError) as exc:
            msg = redact((str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0])
            log.warning("metrics: %s", msg if store is None else f"{store.where}: {msg}")  # no password
            return None
        finally:
            if store is not None:
                store.close()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily("batchprod_db_up", "1 if the central database answered this scrape, else 0 "
                               "(none selected, unreachable or damaged).")
        up.add_metric([], 0 if snap is None else 1)
        yield up
        if snap is not None:
            yield from families(snap)


def metrics_registry(url: str | None = None) -> CollectorRegistry:
    """A private registry (not the process-global one) holding only the central database's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CentralDBCollector(url))
    return registry
