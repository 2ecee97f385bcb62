"""The dispatcher: ready attempts of several runs placed on several sites, in one loop.

Each tick: jobs whose back-off ended become ready; the best ready job of all runs (by priority) is
placed on a site where it fits (site up, under its max jobs and max queued, cores and memory free),
until nothing more fits; every run with changes is committed (one transaction per run per tick,
before any attempt starts); each site starts its batch; each site is polled once for what ended;
walltimes are checked. A site whose scheduler does not answer (``SiteUnavailable``) is left alone
for a while: its attempts are kept, not failed, and nothing new goes there.

Placement: eligibility first (the site takes work, the run may use it, the job fits, its walltime
ends before the site's next scheduled downtime, high-priority or often-preempted work avoids
opportunistic sites while a dedicated one can take it), then the run's (campaign's) priority, then fair
share between groups (campaigns) of equal priority, then the least loaded site weighted by its observed
health. Every site passed over is counted by reason (:attr:`Dispatcher.skips`).

Each site's health (:mod:`health`) is fed from what the loop sees (answers, submissions, ends) and
evaluated every tick: a site declared down takes nothing new, and the work in flight there is
re-dispatched (runs with ``on_site_down = "redispatch"``) or held; a site down long enough is probed
with one job at a time.

Time comes from an injectable clock, so a simulator can drive this very loop in virtual time
(see :class:`batchprod.wms.fake.FakeBackend` and :class:`VirtualClock`).
"""

from __future__ import annotations

import contextlib
import heapq
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from batchprod._gc import long_lived
from batchprod._time import iso
from batchprod.engine.dag import RunDag, classify
from batchprod.engine.health import Health, HealthPolicy, SiteState
from batchprod.execution.states import FailureClass, JobState, RunState
from batchprod.wms.base import Backend, Ended, Launch, SiteUnavailable, SubmitRefused

FLUSH_INTERVAL = 0.25  # seconds between state commits of a run
KILL_GRACE = 3.0  # seconds between the polite and the hard stop on cancel
RETRY_SITE = 5.0  # seconds before an unavailable site is asked again
PREFER_DEDICATED_AFTER = 1  # preemptions of a job after which it avoids opportunistic sites if it can
HIGH_PRIORITY = 1000  # a job at or above this priority avoids opportunistic sites if it can
BIG = 1 << 62


class Clock:
    """Wall and monotonic time, and sleeping: the real ones."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock(Clock):
    """Time that moves only when told to (a simulator's): sleeping advances it at once."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)


@dataclass
class Site:
    """A backend and what the dispatcher has placed on it."""

    name: str
    backend: Backend
    cores: int = BIG
    memory: int = BIG
    max_jobs: int = BIG
    max_queued: int = BIG
    used_cores: int = 0
    used_memory: int = 0
    jobs: int = 0  # attempts placed here and not ended
    down_until: float = 0.0
    down_reason: str | None = None
    #: scheduled downtimes, (start, end) in wall-clock seconds, sorted: no attempt whose walltime would
    #: reach one is placed here (the site drains before it instead of having work killed)
    downtimes: list[tuple[float, float]] = field(default_factory=list)
    #: preemptible (opportunistic) resources: a job preempted PREFER_DEDICATED_AFTER times, or of high
    #: priority, goes here only when no dedicated site can take it; kills here are counted
    opportunistic: bool = False
    preempted: int = 0  # attempts killed from outside on this site
    weight: float = 1.0  # the catalog's preference for the site (placement divides load by it)
    health: Health = field(default_factory=Health)
    started_total: int = 0  # attempts started here (dispatch rate, metrics)
    ended_total: int = 0
    failed_total: int = 0
    peak: dict[str, int] = field(default_factory=lambda: {"jobs": 0, "cores": 0, "memory": 0})

    @classmethod
    def of(cls, name: str, backend: Backend, cores: int | None = None, memory_mb: int | None = None) -> Site:
        cap = backend.capacity()
        return cls(name, backend, cores or cap.cores or BIG, memory_mb or cap.memory_mb or BIG,
                   cap.max_jobs or BIG, cap.max_queued or BIG)

    def crosses_downtime(self, now: float, walltime: float) -> bool:
        """True if work of ``walltime`` seconds started at ``now`` would meet a scheduled downtime
        (or ``now`` is inside one). A job without a walltime is given none of the site's future."""
        horizon = now + walltime if walltime > 0 else float("inf")
        for start, end in self.downtimes:
            if end <= now:
                continue
            return start < horizon
        return False

    def next_downtime(self, now: float) -> tuple[float, float] | None:
        for start, end in self.downtimes:
            if end > now:
                return start, end
        return None

    def takes_work(self, now: float) -> bool:
        return self.down_until <= now and self.health.state != SiteState.DOWN

    def fits(self, cores: int, memory: int) -> bool:
        return self.used_cores + cores <= self.cores and self.used_memory + memory <= self.memory

    def hold(self, cores: int, memory: int) -> None:
        self.used_cores += cores
        self.used_memory += memory
        self.jobs += 1
        p = self.peak
        p["jobs"] = max(p["jobs"], self.jobs)
        p["cores"] = max(p["cores"], self.used_cores)
        p["memory"] = max(p["memory"], self.used_memory)

    def release(self, cores: int, memory: int) -> None:
        self.used_cores -= cores
        self.used_memory -= memory
        self.jobs -= 1


class Dispatcher:
    """Drives several runs (RunDags) on several sites until every run is finished or stopped."""

    def __init__(self, sites: Sequence[Site], clock: Clock | None = None, poll: float = 0.005,
                 flush_interval: float = FLUSH_INTERVAL, policy: HealthPolicy | None = None) -> None:
        if not sites:
            raise ValueError("a dispatcher needs at least one site")
        self.sites = list(sites)
        self.by_name = {s.name: s for s in self.sites}
        self.clock = clock or Clock()
        if policy is not None:
            for s in self.sites:
                s.health.policy = policy
        for s in self.sites:
            s.health.since = s.health.since or self.clock.time()
        self.poll_interval = poll
        self.flush_interval = flush_interval
        self.dags: list[RunDag] = []
        self.by_key: dict[str, RunDag] = {}
        #: why sites were passed over, (site, reason) -> placements that skipped it for that reason
        #: (reason: down, capacity, downtime): the record an operator asks "why not there?" of
        self.skips: Counter[tuple[str, str]] = Counter()
        self.results: dict[str, RunState] = {}
        self.assigned = 0  # attempts placed, for the benchmarks
        self._weight: list[float] = []
        self._last_wall_check = -1e18
        #: virtual time: the smallest jump (ends closer than this are handled in one tick, as real
        #: polling would); 0 = to the next event exactly
        self.virtual_quantum = 0.0
        #: commit every run before a batch starts (crash safety); a simulation turns it off
        self.commit_before_start = True
        self._last_flush = -1e18
        self.on_tick: Callable[[], None] | None = None
        #: called with (site, reason) when a site stops answering, and (site, None) when it answers again
        self.on_site: Callable[[Site, str | None], None] | None = None
        #: called with the site when its health state changed (after the dispatcher acted on it)
        self.on_state: Callable[[Site], None] | None = None
        #: called with (run, job) for each job failed for good (incidents group them by signature)
        self.on_failed: Callable[[RunDag, int], None] | None = None

    def add(self, dag: RunDag) -> None:
        self.dags.append(dag)
        self.by_key[dag.key] = dag

    # -- one tick -----------------------------------------------------------------------------------
    def assign(self) -> dict[int, list[tuple[RunDag, Launch]]]:
        """Ready attempts -> sites until nothing more fits: the run of highest priority first; among runs
        of equal priority the one furthest below its share (cores in use / share), as HTCondor
        accounting groups and PanDA global shares do; then the job's own priority. A run waits for
        room for its best job rather than let smaller ones jump ahead (strict priority within a run);
        a job bigger than every site runs alone on an empty one, not never."""
        now = self.clock.monotonic()
        batches: dict[int, list[tuple[RunDag, Launch]]] = {}
        cands: list[tuple[int, float, int, int, int]] = []
        use: dict[str, float] = {}  # cores in use per fair-share group (campaign)
        several = len(self.dags) > 1
        for dag in self.dags:
            if several and not dag.stopping:
                use[dag.group] = use.get(dag.group, 0.0) + dag.held
        for i, dag in enumerate(self.dags):
            if dag.stopping or dag.paused:
                continue
            dag.promote(now)
            top = dag.top()
            if top is not None:
                cands.append((-dag.priority, use.get(dag.group, 0.0) / dag.share, -top[0], i, top[1]))
        heapq.heapify(cands)
        sites = [k for k, s in enumerate(self.sites) if s.takes_work(now)]
        if cands:
            for s in self.sites:
                if not s.takes_work(now):
                    self.skips[(s.name, "down")] += len(cands)
        if not sites:
            return batches
        room = {}
        # placement weight: the catalog's, times the observed health (1 - recent fault rate), times the
        # share of its attempts actually running (a site whose queue does not move is preferred less)
        self._weight = weight = [s.weight * s.health.weight() for s in self.sites]
        for k in sites:
            s = self.sites[k]
            queued = s.backend.queued()
            room[k] = min(s.max_jobs - s.jobs, s.max_queued - queued)
            if s.health.state == SiteState.PROBING:  # one probe at a time
                room[k] = min(room[k], 1 - s.jobs)
            if queued and s.jobs:
                weight[k] *= max(0.1, 1.0 - queued / s.jobs)
        one = len(sites) == 1 and not self.sites[sites[0]].downtimes
        # sites with room now; a site leaves the list when it fills up, and placement ends when none is
        # left (not one futile pass over every site for every waiting run: 100 runs x 10 full sites)
        full = [k for k in sites if not self._has_room(k, room)]
        sites = [k for k in sites if k not in full]
        groups = len(use) > 1
        while cands:
            if not sites:
                for k in full:
                    self.skips[(self.sites[k].name, "capacity")] += len(cands)
                break
            entry = heapq.heappop(cands)
            *_, i, j = entry
            dag = self.dags[i]
            if groups:  # lazy: another run of the group took cores since this entry was keyed
                cur = use[dag.group] / dag.share
                if cur > entry[1]:
                    heapq.heappush(cands, (entry[0], cur, entry[2], i, j))
                    continue
            k = self._place(dag, j, sites, room, batches, one)
            if k is None:
                continue  # this run waits for room (its lower jobs too)
            site = self.sites[k]
            cores, mem = dag.demand(j)
            cores = min(cores, site.cores)
            launch = dag.take(j, cores)
            site.hold(cores, mem)
            room[k] -= 1
            if not self._has_room(k, room):
                sites.remove(k)
                full.append(k)
            batches.setdefault(k, []).append((dag, launch))
            self.assigned += 1
            if several:
                use[dag.group] += cores  # (dag.held grew by as much in take())
            top = dag.top()
            if top is not None:
                heapq.heappush(cands, (-dag.priority, use.get(dag.group, 0.0) / dag.share, -top[0], i, top[1]))
        return batches

    def _has_room(self, k: int, room: dict[int, int]) -> bool:
        s = self.sites[k]
        return room[k] > 0 and s.used_cores < s.cores and s.used_memory < s.memory

    def _place(self, dag: RunDag, j: int, sites: list[int], room: dict[int, int],
               batches: dict[int, list[tuple[RunDag, Launch]]], one: bool) -> int | None:
        want, mem = dag.demand(j)
        allowed = dag.sites
        if one:  # the common case, kept cheap: one run, one site
            k = sites[0]
            if room[k] <= 0 or (allowed is not None and self.sites[k].name not in allowed):
                return None
            site = self.sites[k]
            if site.fits(min(want, site.cores), mem) or (site.jobs == 0 and k not in batches):
                return k
            return None
        best, best_load, spare, spare_load = None, float("inf"), None, float("inf")
        res = dag.resources(j)
        walltime = dag.walltime(j)
        # kills on preemptible resources are not the job's fault, but a job that was preempted (or
        # matters most) should not go back there while a dedicated site can take it
        avoid = dag.preemptions(j) >= PREFER_DEDICATED_AFTER or res.priority >= HIGH_PRIORITY
        # nor, while another site can take it, to the site its last attempt was killed on or lost to
        shun = dag.shun.get(j) if dag.shun else None
        now = self.clock.time()
        skips = self.skips
        weight = self._weight
        for k in sites:
            site = self.sites[k]
            if allowed is not None and site.name not in allowed:
                skips[(site.name, "excluded")] += 1
                continue
            if room[k] <= 0 or not site.fits(min(want, site.cores), mem):
                skips[(site.name, "capacity")] += 1
                continue
            if site.downtimes and site.crosses_downtime(now, walltime):
                skips[(site.name, "downtime")] += 1
                continue
            if site.opportunistic and not res.preemptible:  # (ctrl_bps preemptible: false)
                skips[(site.name, "not-preemptible")] += 1
                continue
            load = site.used_cores / site.cores if site.cores < BIG else site.jobs / max(site.max_jobs, 1)
            load = (load + 1e-9) / weight[k]
            if (avoid and site.opportunistic) or site.name == shun:
                if load < spare_load:
                    spare, spare_load = k, load
                continue
            if load < best_load:
                best, best_load = k, load
        if best is None and spare is not None:
            if self.sites[spare].name == shun and self._elsewhere(dag, spare, res.preemptible, mem, now):
                skips[(shun, "killed-here")] += 1
                return None  # another site can take it once it has room: wait for that, not a new kill
            return spare  # nothing dedicated can take it: the opportunistic site, rather than wait
        if spare is not None:
            skips[(self.sites[spare].name, "opportunistic" if avoid and self.sites[spare].opportunistic
                   else "killed-here")] += 1
        if best is None:  # bigger than every site's free room: alone on an empty site, if one is
            for k in sites:
                site = self.sites[k]
                if (room[k] > 0 and site.jobs == 0 and k not in batches
                        and (allowed is None or site.name in allowed)
                        and not (site.downtimes and site.crosses_downtime(now, walltime))):
                    return k
        return best

    def _elsewhere(self, dag: RunDag, k: int, preemptible: bool, mem: int, now: float) -> bool:
        """Whether a site other than ``k`` takes work, may run the job and is big enough for it."""
        allowed = dag.sites
        return any(i != k and s.takes_work(now) and (allowed is None or s.name in allowed)
                   and s.memory >= mem and (preemptible or not s.opportunistic)
                   for i, s in enumerate(self.sites))

    def start(self, batches: dict[int, list[tuple[RunDag, Launch]]]) -> None:
        """Commit every run that changed (the attempts are durable before any starts), then start
        each site's batch in one call."""
        self.flush(force=self.commit_before_start)
        for k, batch in batches.items():
            site = self.sites[k]
            launches = [launch for _, launch in batch]
            try:
                handles = site.backend.start(launches)
            except (SiteUnavailable, SubmitRefused) as exc:
                if isinstance(exc, SubmitRefused) and len(self.sites) == 1:
                    raise  # nowhere else to go: the operator must fix the site (one clear line)
                site.health.submitted(False, self.clock.time(), exc.reason)
                if isinstance(exc, SiteUnavailable):  # (a refusal is evidence too: "submissions fail")
                    self._site_down(site, exc.reason)
                for dag, launch in batch:
                    site.release(launch.cores, launch.memory)
                    dag.not_started(launch, str(exc))
                continue
            site.health.submitted(True, self.clock.time())
            self._site_up(site)
            now = self.clock.time()
            site.started_total += len(batch)
            for (dag, launch), handle in zip(batch, handles, strict=True):
                dag.started(launch, handle, site.name, now)

    def collect(self) -> int:
        """Poll every site with attempts once; record what ended. Returns how many ended."""
        n = 0
        now = self.clock.monotonic()
        for site in self.sites:
            if site.jobs == 0 or site.down_until > now:
                continue
            try:
                ended = site.backend.poll()
            except SiteUnavailable as exc:
                self._site_down(site, exc.reason)
                continue
            self._site_up(site)
            n += sum(self._ended(site, e) for e in ended)
        return n

    def _ended(self, site: Site, e: Ended) -> bool:
        """Give an end to its run and free what the attempt held; False for an attempt no run here
        knows (of a run no longer driven here, or a stale report)."""
        dag = self.by_key.get(e.run) or (self.dags[0] if len(self.dags) == 1 else None)
        a = dag.finish(e, site.memory) if dag is not None else None
        if a is None:
            return False
        held = self.by_name[a.site]
        held.release(a.cores, a.memory)
        ok = dag.status[e.job] == JobState.SUCCEEDED
        # (exit 0 without its manifest is the payload's failure: the run says user_error)
        fclass = None if ok else (e.fclass or classify(e.exit_code, e.signal) or FailureClass.USER_ERROR)
        held.ended_total += 1
        if fclass is not None and fclass != FailureClass.CANCELLED:  # (a cancellation is nobody's failure)
            held.failed_total += 1
            if fclass == FailureClass.KILLED:
                held.preempted += 1
            if self.on_failed is not None and dag.status[e.job] == JobState.FAILED:
                self.on_failed(dag, e.job)
        held.health.ended(fclass, e.reason, held.opportunistic, self.clock.time())
        return True

    def _site_down(self, site: Site, reason: str) -> None:
        site.health.unanswered(self.clock.time(), reason)
        was_up = site.down_reason is None
        site.down_until = self.clock.monotonic() + RETRY_SITE
        site.down_reason = reason
        if was_up and self.on_site is not None:
            self.on_site(site, reason)

    def _site_up(self, site: Site) -> None:
        site.health.answered()
        if site.down_reason is not None:
            site.down_reason = None
            if self.on_site is not None:
                self.on_site(site, None)

    def check_health(self) -> None:
        """Evaluate every site's evidence; act on a change (a site down: its work in flight is
        re-dispatched or held, per run) and report it."""
        now = self.clock.time()
        for site in self.sites:
            h = site.health
            in_force = soon = None
            if site.downtimes:
                nxt = site.next_downtime(now)
                if nxt is not None and nxt[0] <= now:
                    in_force = f"until {iso(nxt[1])}"
                elif nxt is not None and nxt[0] - now <= h.policy.drain_horizon:
                    soon = f"at {iso(nxt[0])}"
            alone = not any(o is not site and o.health.takes_work() for o in self.sites)
            h.evaluate(now, in_force, soon, alone)
            if not h.take_change():
                continue
            if h.state == SiteState.DOWN:
                self.redispatch(site, f"site {site.name} down: {h.evidence}")
            if self.on_state is not None:
                self.on_state(site)

    def redispatch(self, site: Site, why: str) -> int:
        """Work in flight on a site declared down goes back to the ready set of its run (budget kept)
        for other sites, unless its run holds it (``on_site_down = "hold"``). The attempt left behind,
        if it still runs, can never publish: its replacement fences it off. Returns how many moved."""
        moved = 0
        handles = []
        for dag in self.dags:
            if dag.on_site_down != "redispatch":
                continue
            gone = [a for a in dag.active.values() if a.site == site.name]
            for a in gone:
                dag.abandon(a.job, f"{why}; re-dispatched (budget kept)")
                site.release(a.cores, a.memory)
                handles.append(a.handle)
            moved += len(gone)
        if handles:
            # best effort: the site may not answer at all, and its refusal changes nothing here
            with contextlib.suppress(Exception):
                site.backend.kill_many(handles, FailureClass.INFRASTRUCTURE, why)
        return moved

    def check_walltime(self) -> None:
        """Kill attempts past their walltime; a scan of the runs that have walltimes, at most once a
        second (a walltime is coarse; a tick is not)."""
        mono = self.clock.monotonic()
        if mono - self._last_wall_check < 1.0:
            return
        self._last_wall_check = mono
        now = self.clock.time()
        for dag in self.dags:
            if not dag.has_walltime:
                continue
            for a in dag.active.values():
                wall = a.launch.walltime
                if not wall or a.killing:
                    continue
                backend = self.by_name[a.site].backend
                since = backend.running_since(a.handle)
                if since is not None and now - since > wall:
                    a.killing = True
                    backend.kill(a.handle, FailureClass.TIMEOUT, f"timeout: past requestWalltime {wall}s")

    def flush(self, force: bool = False) -> None:
        now = self.clock.monotonic()
        if not force and now - self._last_flush <= self.flush_interval:
            return
        for dag in self.dags:
            if dag.dirty() or force:
                dag.flush()
            elif dag.progress is not None:  # nothing changed (a long job runs): progress still ticks
                dag.progress(dag.counts(), dag.label_counts())
        self._last_flush = now

    def retire(self) -> None:
        """Runs with nothing left to do end (after their final job, if one is due); a run being
        cancelled ends when its last attempt did."""
        for dag in list(self.dags):
            if dag.stopping and not dag.active:
                dag.cancel_rest(f"cancelled ({dag.stopping})")
                outcome = RunState.CANCELLED
            elif dag.idle() and dag.finish_or_final():
                outcome = dag.outcome()
            else:
                continue
            dag.flush()
            self.results[dag.key] = outcome
            self.dags.remove(dag)
            del self.by_key[dag.key]

    def tick(self) -> bool:
        """One round; True if anything started or ended."""
        batches = self.assign()
        if batches:
            self.start(batches)
        ended = self.collect()
        self.check_walltime()
        self.check_health()
        self.flush()
        self.retire()
        if self.on_tick is not None:
            self.on_tick()
        return bool(batches) or ended > 0

    def run(self, stop: Callable[[], str | None] = lambda: None) -> dict[str, RunState]:
        """Until every run is finished; ``stop()`` returning a reason cancels all of them."""
        with long_lived():
            while self.dags:
                reason = stop()
                if reason:
                    self.cancel_all(reason)
                    break
                if not self.tick():
                    self.wait()
        return self.results

    def wait(self) -> None:
        if isinstance(self.clock, VirtualClock):
            self._jump()
            return
        busy = [s for s in self.sites if s.jobs and s.down_until <= self.clock.monotonic()]
        if len(busy) == 1:
            busy[0].backend.wait(self.poll_interval)
        elif busy:
            for s in busy:
                s.backend.wait(self.poll_interval / len(busy))
        else:
            self.clock.sleep(self.poll_interval)

    def _jump(self) -> None:
        """Virtual time: straight to the next thing that can happen (an attempt ends, a back-off or
        a walltime expires, a site is asked again), not in poll-sized steps."""
        now = self.clock.monotonic()
        wall_now = self.clock.time()
        times = [s.down_until for s in self.sites if s.down_until > now]
        times += [now + t - wall_now for s in self.sites for w in s.downtimes for t in w if t > wall_now]
        for s in self.sites:  # a probe is due, a silent scheduler's grace ends
            h = s.health
            if h.state == SiteState.DOWN and not h.scheduled:
                times.append(now + h.probe_at - wall_now)
            if h.unanswered_since is not None:
                times.append(now + h.unanswered_since + h.policy.unanswered_for - wall_now)
        for s in self.sites:
            nxt = getattr(s.backend, "next_end", None)
            if s.jobs and nxt is not None and (t := nxt()) is not None:
                times.append(t)
        for dag in self.dags:
            if dag.delayed:
                times.append(dag.delayed[0][0])
            if not dag.has_walltime:
                continue
            for a in dag.active.values():
                if a.launch.walltime and not a.killing:
                    since = self.by_name[a.site].backend.running_since(a.handle)
                    # (just past it: a walltime is exceeded when more than it has passed)
                    times.append(now + (since if since is not None else wall_now) + a.launch.walltime - wall_now + 1e-3)
        later = [t for t in times if t > now]
        nxt = min(later) if later else now + self.poll_interval
        self.clock.sleep(max(nxt, now + self.virtual_quantum) - now)

    def cancel(self, dag: RunDag, why: str) -> None:
        """Stop one run (its campaign was cancelled): its attempts are killed, their ends recorded as
        they come; it retires as CANCELLED when the last one ended. Others go on."""
        dag.stopping = why
        for site in self.sites:
            handles = [a.handle for a in dag.active.values() if a.site == site.name]
            if handles:
                try:
                    site.backend.kill_many(handles, FailureClass.CANCELLED, f"cancelled ({why})")
                except SiteUnavailable as exc:
                    self._site_down(site, exc.reason)

    def cancel_all(self, why: str) -> None:
        """Stop every attempt of every run (whole process groups / scheduler jobs); what ends in
        the meantime is recorded; everything unfinished becomes CANCELLED."""
        reason = f"cancelled ({why})"
        for dag in self.dags:
            dag.stopping = why
        for site in self.sites:
            handles = [a.handle for dag in self.dags for a in dag.active.values() if a.site == site.name]
            if handles:
                site.backend.kill_many(handles, FailureClass.CANCELLED, reason)
        deadline = self.clock.monotonic() + KILL_GRACE + 30
        while any(dag.active for dag in self.dags) and self.clock.monotonic() < deadline:
            ended = 0
            for site in self.sites:
                if not site.jobs:
                    continue
                site.backend.escalate(KILL_GRACE)
                try:
                    polled = site.backend.poll()
                except SiteUnavailable:
                    continue
                for e in polled:
                    # an attempt that raced to success keeps it; anything else ends as cancelled
                    if e.fclass is None and (e.exit_code != 0 or e.signal is not None):
                        e.fclass, e.reason = FailureClass.CANCELLED, reason
                    ended += self._ended(site, e)
            if not ended:
                self.clock.sleep(0.02)
        for dag in list(self.dags):
            dag.cancel_rest(reason)
            dag.flush()
            self.results[dag.key] = RunState.CANCELLED
        self.dags.clear()
        self.by_key.clear()

