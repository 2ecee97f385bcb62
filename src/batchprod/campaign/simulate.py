"""``batchprod campaign simulate CAMPAIGN SITES``: the *real* campaign dispatcher (same runner, same
engine, same placement and health code) against simulated sites in virtual time.

Each catalog site becomes a :class:`~batchprod.wms.fake.FakeBackend` with the site's capacity; a job
lasts its label's duration (from the campaign file's ``simulation`` section, or the median of a
finished run's attempts with ``--history RUN``), with a deterministic jitter; it fails with its
label's failure rate and, on opportunistic sites, is preempted with the preemption rate. Outages are
injected on a schedule (the site's scheduler stops answering: the dispatcher must notice on its own).
Nothing touches the campaign's repositories: runs are prepared into a scratch directory (a step
whose inputs do not exist yet is simulated with ``simulation.jobs.<step>`` synthetic jobs).

    simulation:
      defaultDuration: 60          # seconds, for labels not listed
      durations: {isr: 90, coadd: 600}
      jitter: 0.2                  # +-20 % per attempt
      failureRate: {coadd: 0.01}   # per label ('*': every label)
      preemptionRate: 0.05         # per attempt on opportunistic sites
      jobs: {step2: 100000}        # synthetic jobs for a step (split over its runs)
      outages: [{site: cluster, start: 3600, end: 7200}]   # seconds from the start
      sample: 300                  # seconds between utilization samples

The report: makespan, per-site utilization over time and its mean, queue lengths, when each
campaign (by priority) finished, site state changes; a PNG plot (matplotlib) if asked.
"""

from __future__ import annotations

import hashlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchprod.campaign.db import CampaignDB
from batchprod.campaign.runner import CampaignRunner
from batchprod.campaign.sites import SiteCatalog, _pydantic_problem
from batchprod.campaign.spec import CampaignSpec
from batchprod.engine.dispatcher import BIG, Site, VirtualClock
from batchprod.engine.health import HealthPolicy
from batchprod.errors import ConfigError
from batchprod.execution.states import FailureClass
from batchprod.state.run import Run
from batchprod.wms.base import Capacity, Launch
from batchprod.wms.fake import FakeBackend, FakeEnd


class Outage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    site: str
    start: float = Field(ge=0)
    end: float = Field(gt=0)


class SimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    default_duration: float = Field(60.0, gt=0, alias="defaultDuration")
    durations: dict[str, float] = {}
    jitter: float = Field(0.2, ge=0, lt=1)
    failure_rate: dict[str, float] = Field({}, alias="failureRate")
    preemption_rate: float = Field(0.0, ge=0, lt=1, alias="preemptionRate")
    jobs: dict[str, int] = {}
    outages: list[Outage] = []
    sample: float = Field(300.0, gt=0)
    seed: int = 0

    @field_validator("failure_rate", mode="before")
    @classmethod
    def _rate(cls, v: Any) -> Any:
        if isinstance(v, int | float) and not isinstance(v, bool):
            v = {"*": v}
        if isinstance(v, dict):
            for k, r in v.items():
                if not isinstance(r, int | float) or not 0 <= r < 1:
                    raise ValueError(f"failureRate.{k}: a rate in [0, 1), got {r!r}")
        return v

    @field_validator("durations")
    @classmethod
    def _dur(cls, v: dict[str, float]) -> dict[str, float]:
        for k, d in v.items():
            if not d > 0:
                raise ValueError(f"durations.{k}: seconds > 0, got {d!r}")
        return v


def sim_settings(spec: CampaignSpec, where: str) -> SimSettings:
    try:
        return SimSettings.model_validate(spec.simulation)
    except ValidationError as exc:
        loc, problem = _pydantic_problem(exc)
        raise ConfigError(f"{where}: simulation{loc}: {problem}") from None


def history_settings(settings: SimSettings, runs: list[Run]) -> SimSettings:
    """Durations (median wall time of succeeded attempts) and failure rates per label from finished
    runs; what the campaign file says explicitly wins."""
    walls: dict[str, list[float]] = defaultdict(list)
    tries: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for run in runs:
        labels = {j["id"]: j["label"] for j in run.store.jobs()}
        for a in run.store.attempts():
            lab = labels.get(a["job_id"], "?")
            if a["status"] == "SUCCEEDED" and a["wall_s"]:
                walls[lab].append(float(a["wall_s"]))
            if a["status"] in ("SUCCEEDED", "FAILED"):
                tries[lab][0] += 1
                tries[lab][1] += a["status"] == "FAILED"
    durations = {lab: max(statistics.median(w), 0.001) for lab, w in walls.items()}
    rates = {lab: min(f / n, 0.99) for lab, (n, f) in tries.items() if n}
    return settings.model_copy(update={"durations": {**durations, **settings.durations},
                                       "failure_rate": {**rates, **settings.failure_rate}})


_SALTS: dict[str, int] = {}


def _u(run: str, job: int, attempt: int, what: int) -> float:
    """A deterministic uniform [0, 1) for (run, job, attempt, what): the same simulation gives the same
    result. A per-run salt (hashed once) and an integer mix per call (called for every attempt)."""
    salt = _SALTS.get(run)
    if salt is None:  # (a run's key is its scratch submit directory: only its place under it is stable)
        stable = run.rsplit("/runs/", 1)[-1]
        salt = _SALTS[run] = int.from_bytes(hashlib.blake2b(stable.encode(), digest_size=8).digest(), "big")
    x = (salt ^ (job * 0x9E3779B97F4A7C15) ^ (attempt * 0xC2B2AE3D27D4EB4F) ^ (what * 0x165667B19E3779F9)) \
        & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 33
    return x / 2**64


@dataclass
class SimResult:
    start: float
    makespan: float
    wall_seconds: float
    jobs: int
    assignments: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    campaigns: list[dict[str, Any]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    site_events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"makespan_s": round(self.makespan, 1), "wall_s": round(self.wall_seconds, 2), "jobs": self.jobs,
                "assignments": self.assignments, "campaigns": self.campaigns, "sites": self.sites,
                "site_events": self.site_events, "samples": self.samples}


class _SimRunner(CampaignRunner):
    """The real runner, sampling site use and queues at every control round and injecting outages."""

    outages: list[Outage]
    samples: list[dict[str, Any]]
    t0: float
    quantum: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        d = self.engine.dispatcher
        # simulated attempts need no crash safety: run states are committed once per control round
        d.commit_before_start = False
        d.flush_interval = self.control_interval
        # ends within 1 % of a job's duration are one tick, as a real poll would see them
        d.virtual_quantum = self.quantum
        self.engine._ingest = lambda _run: None  # type: ignore[method-assign] (nothing is produced)

    def control(self) -> bool:
        now = self.clock.time()
        for o in self.outages:
            site = self.engine.dispatcher.by_name.get(o.site)
            if site is None:
                continue
            down = self.t0 + o.start <= now < self.t0 + o.end
            site.backend.unavailable = "simulated outage" if down else None  # type: ignore[attr-defined]
        busy = super().control()
        d = self.engine.dispatcher
        queued: dict[int, int] = defaultdict(int)
        for lv in self.live.values():
            queued[lv.dag.priority] += len(lv.dag.heap) + len(lv.dag.delayed)
        self.samples.append({
            "t": round(now - self.t0, 1),
            "use": {s.name: round(s.used_cores / s.cores, 4) if s.cores < BIG else s.jobs for s in d.sites},
            "state": {s.name: s.health.state.value for s in d.sites},
            "queued_by_priority": dict(queued),
        })
        return busy


def simulate(spec: CampaignSpec, catalog: SiteCatalog, where: str = "campaign", history: list[Run] | None = None,
             workdir: Path | None = None, extra: list[CampaignSpec] | None = None,
             control_interval: float | None = None,
             instrument: Callable[[CampaignRunner], None] | None = None, start: float | None = None) -> SimResult:
    """Run the campaign (and ``extra`` ones sharing the sites) in virtual time; see the module doc.
    Virtual time starts at ``start`` (default: now, for the catalog's scheduled downtimes), on a whole
    second: the same inputs then give the same result whatever the fraction of the second it was
    started in (float sums of times differ in their last bits by the start's fraction)."""
    settings = sim_settings(spec, where)
    if history:
        settings = history_settings(settings, history)
    with tempfile.TemporaryDirectory(prefix="batchprod-sim-") as tmp:
        root = Path(workdir or tmp)
        clock = VirtualClock(start=float(int(time.time() if start is None else start)))
        db = CampaignDB(f"sqlite:///{root / 'sim.db'}")
        specs = [spec, *(extra or [])]
        step_of = {cfg: (s.name, len(s.submit)) for sp in specs for s in sp.steps for cfg in s.submit}
        for sp in specs:
            db.create(sp, clock.time())
            db.command(sp.name, "start", clock.time())
            for step in sp.steps:  # nobody would release a gate in virtual time: they are open
                if step.gate:
                    db.release_gate(sp.name, step.name)
        sites = [_site(clock, cs, settings) for cs in catalog.sites.values()]
        counter = [0]

        def prepare(config: str) -> Run:
            counter[0] += 1
            step, n_runs = step_of[config]
            n = settings.jobs.get(step)
            if n is not None:
                return synthetic_run(root / "runs" / f"{counter[0]}", max(1, n // n_runs), f"sim{counter[0]}")
            from batchprod.engine.prepare import prepare as real_prepare

            # every job as if the output run were empty (what the campaign will run is the question; a
            # run that already holds outputs is not refused, and nothing is written to the registry)
            return real_prepare(config, {"submitPath": str(root / "runs" / f"{counter[0]}")}, existing="ignore")

        _SimRunner.quantum = max(0.01, min([settings.default_duration, *settings.durations.values()]) / 100)
        runner = _SimRunner(db, sites, clock=clock, control_interval=control_interval or settings.sample,
                            policy=HealthPolicy(), prepare=prepare)
        runner.outages, runner.samples, runner.t0 = settings.outages, [], clock.time()
        if instrument is not None:
            instrument(runner)
        t = time.perf_counter()
        runner.run()
        wall = time.perf_counter() - t
        return _report(db, runner, sites, wall, specs)


def _site(clock: VirtualClock, cs: Any, settings: SimSettings) -> Site:
    cap = cs.capacity
    cores = cap.cores or cap.max_jobs or 1000
    jitter, rates = settings.jitter, settings.failure_rate

    def duration(launch: Launch) -> float:
        base = settings.durations.get(launch.label, settings.default_duration)
        return base * (1 + jitter * (2 * _u(launch.run, launch.job, launch.attempt, 1) - 1))

    def outcome(launch: Launch) -> FakeEnd | None:
        if cs.opportunistic and settings.preemption_rate and \
                _u(launch.run, launch.job, launch.attempt, 2) < settings.preemption_rate:
            return FakeEnd(exit_code=None, signal=9, fclass=FailureClass.KILLED, reason="preempted (simulated)")
        rate = rates.get(launch.label, rates.get("*", 0.0))
        if rate and _u(launch.run, launch.job, launch.attempt, 3) < rate:
            return FakeEnd(exit_code=1, reason=f"simulated failure of {launch.label}")
        return None

    backend = FakeBackend(clock, duration=duration, outcome=outcome, name=cs.name,
                          capacity=Capacity(cores=cores, memory_mb=cap.memory_mb or cores * 4096))
    site = Site(cs.name, backend, cores, cap.memory_mb or cores * 4096, cap.max_jobs or BIG, BIG)
    cs.apply_to(site)
    return site


class MemoryStore:
    """The state of a simulated run: its RunDag keeps it in memory, nothing is written (``discards``).
    What the engine asks of a store at open and close is answered; there is nothing to recover."""

    discards = True

    def __init__(self, name: str, submit_dir: str, n_jobs: int, request_memory: int = 2048) -> None:
        self.info: dict[str, Any] = {"name": name, "submit_dir": submit_dir, "wms": "fake", "n_jobs": n_jobs,
                                     "status": "PENDING", "message": None}
        self.n_jobs, self.request_memory = n_jobs, request_memory
        self.where = f"(simulated run {name})"

    def job_columns(self, *cols: str) -> list[tuple[Any, ...]]:
        value = {"status": "PENDING", "attempts": 0, "request_memory": self.request_memory}
        return [tuple(j if c == "id" else value[c] for c in cols) for j in range(self.n_jobs)]

    def attempts(self, *_args: Any, **_kw: Any) -> list[dict[str, Any]]:
        return []

    def write(self, *_args: Any) -> None:
        return None

    def drop_outputs(self, _job: int) -> None:
        return None

    def set_run(self, **fields: Any) -> None:
        self.info.update(fields)

    def run_info(self) -> dict[str, Any]:
        return self.info

    def begin_execution(self, *_args: Any) -> int:
        return 1

    def end_execution(self, _session: int) -> None:
        return None

    def close(self) -> None:
        return None


class SimRun(Run):
    """A simulated run: a synthetic graph and workflow in memory, a :class:`MemoryStore`."""

    def __init__(self, submit_dir: Path, n_jobs: int, name: str) -> None:  # (no super().__init__: no files)
        from batchprod.graph.synthetic import synthetic_graph
        from batchprod.workflow import Resources, cluster_quanta

        submit_dir.mkdir(parents=True)
        self.submit_dir = submit_dir.resolve()
        qg = synthetic_graph(n_jobs, detectors=min(189, max(1, n_jobs // 4)))
        wf = cluster_quanta(qg, [], lambda label, cluster: Resources(),
                            run={"repo": str(submit_dir), "output_run": name})
        self.__dict__.update(qgraph=qg, workflow=wf, config={"computeSite": "simulated"})
        self.store = MemoryStore(name, str(self.submit_dir), len(wf))  # type: ignore[assignment]


def synthetic_run(submit_dir: Path, n_jobs: int, name: str) -> Run:
    """A simulated run of about ``n_jobs`` jobs of the synthetic DRP shape (one job per quantum)."""
    return SimRun(submit_dir, n_jobs, name)


def _report(db: CampaignDB, runner: _SimRunner, sites: list[Site], wall: float, specs: list[CampaignSpec]) -> SimResult:
    t0 = runner.t0
    ends = {e["subject"]: e["time"] for e in db.events(kind="campaign", limit=10**6) if e["state"] in ("done", "failed")}
    campaigns = []
    for sp in specs:
        c = db.get(sp.name)
        campaigns.append({"campaign": sp.name, "priority": c["priority"], "share": c["share"], "state": c["state"],
                          "finished_s": round(ends[sp.name] - t0, 1) if sp.name in ends else None,
                          "message": c["message"]})
    samples = runner.samples
    site_rows = []
    for s in sites:
        uses = [x["use"].get(s.name, 0.0) for x in samples]
        site_rows.append({"site": s.name, "cores": s.cores if s.cores < BIG else None, "started": s.started_total,
                          "failed": s.failed_total, "preempted": s.preempted, "peak_cores": s.peak["cores"],
                          "mean_utilization": round(sum(uses) / len(uses), 3) if uses else 0.0})
    events = [{"t": round(e["time"] - t0, 1), "site": e["subject"], "state": e["state"], "evidence": e["message"]}
              for e in db.events(kind="site", limit=10**6)]
    last = max([c["finished_s"] or 0.0 for c in campaigns] + [0.0])
    jobs = sum(r["n_jobs"] or 0 for sp in specs for r in db.runs(db.get(sp.name)["id"]))
    return SimResult(t0, last, wall, jobs, runner.engine.dispatcher.assigned, samples, campaigns, site_rows, events)


def check_plotting(path: Path | None = None) -> None:
    """Before a long simulation: say at once if the plot cannot be drawn (or written)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'batchprod[plot]'") from None
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"--plot {path}: no such directory {Path(path).resolve().parent}")


def plot(result: SimResult, path: Path) -> None:
    """Utilization per site over time, and queued jobs by campaign priority over time."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ts = [x["t"] / 3600 for x in result.samples]
    for s in result.sites:
        top.plot(ts, [x["use"].get(s["site"], 0.0) for x in result.samples], label=s["site"], linewidth=1)
    top.set_ylabel("cores in use / capacity")
    top.set_ylim(0, 1.05)
    top.legend(loc="lower left", fontsize="small", ncol=5)
    prios = sorted({int(p) for x in result.samples for p in x["queued_by_priority"]}, reverse=True)
    for p in prios[:10]:
        bottom.plot(ts, [x["queued_by_priority"].get(p, 0) for x in result.samples], label=f"priority {p}")
    bottom.set_ylabel("ready jobs waiting")
    bottom.set_xlabel("hours since start (virtual)")
    if prios:
        bottom.legend(loc="upper right", fontsize="small")
    fig.suptitle(f"makespan {result.makespan / 3600:.1f} h, {result.assignments:,} attempts "
                 f"(simulated in {result.wall_seconds:.1f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
