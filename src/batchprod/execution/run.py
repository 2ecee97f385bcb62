"""Runs: prepare a submit directory (frozen config, graph, workflow, state store) and open it again.

A submit directory is assembled under a temporary name and renamed into place only when complete,
so a bad input or a crash during prepare leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from batchprod.config import BpsConfig, Context, load_config
from batchprod.config.keys import PAYLOAD_KEYS
from batchprod.errors import ConfigError, RunError
from batchprod.execution.store import STATE_FILE, StateStore
from batchprod.graph import QuantumGraph, Registry, build_quantum_graph
from batchprod.pipeline import load_pipeline
from batchprod.workflow import GenericWorkflow, workflow_from_config
from batchprod.workflow.generic import FinalJob

QGRAPH_FILE = "qgraph.bpqg"
WORKFLOW_FILE = "workflow.bpwf"
CONFIG_FILE = "config.yaml"
REGISTRY_FILE = "registry.db"
LOG_DIR = "logs"


@dataclass
class Timing:
    """Seconds and peak memory of one prepare stage (logged like ctrl_bps's stage timers)."""

    stage: str
    seconds: float
    peak_mb: float


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Run:
    """An existing run: its submit directory, state store, and (lazily) its graph and workflow."""

    def __init__(self, submit_dir: str | Path) -> None:
        self.submit_dir = Path(submit_dir).resolve()
        if not (self.submit_dir / STATE_FILE).is_file():
            raise RunError(f"{submit_dir}: not a batchprod run (no {STATE_FILE})")
        self.store = StateStore(self.submit_dir / STATE_FILE)

    @cached_property
    def qgraph(self) -> QuantumGraph:
        return QuantumGraph.load(self.submit_dir / QGRAPH_FILE)

    @cached_property
    def workflow(self) -> GenericWorkflow:
        return GenericWorkflow.load(self.submit_dir / WORKFLOW_FILE, self.qgraph)

    @cached_property
    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.submit_dir / CONFIG_FILE).read_text())

    @property
    def name(self) -> str:
        return str(self.store.run_info()["name"])

    @property
    def log_dir(self) -> Path:
        return self.submit_dir / LOG_DIR

    def attempt_paths(self, label: str, name: str, attempt: int | str) -> tuple[Path, Path, Path]:
        """stdout, stderr and result manifest of one attempt: logs/<label>/<name>.<attempt>.*"""
        d = self.log_dir / label
        return d / f"{name}.{attempt}.out", d / f"{name}.{attempt}.err", d / f"{name}.{attempt}.result.json"

    def site(self, key: str, default: Any = None) -> Any:
        """A typed value from the run's compute-site section (``site.<computeSite>.<key>``)."""
        return site_value(self.config, key, default)

    def site_budget(self) -> tuple[int | None, int | None]:
        """(cores, memory MB) the site config grants the local executor, None = the machine's."""
        return self.site("cores"), self.site("memory")

    def wms_name(self) -> str:
        return str(self.store.run_info()["wms"])


def site_value(config: dict[str, Any], key: str, default: Any = None, site: str | None = None) -> Any:
    """``site.<computeSite>.<key>`` of a config mapping, converted by the key table; ``default`` if unset."""
    from batchprod.config.keys import SITE_KEYS

    name = site or config.get("computeSite") or "local"
    section = (config.get("site") or {}).get(name) or {}
    return SITE_KEYS[key](section[key]) if key in section else default


def find_run(ref: str | Path, submit_root: str | Path | None = None) -> Run:
    """A run by submit directory path or by name (relative to the submit root, default ./submit)."""
    p = Path(ref)
    if (p / STATE_FILE).is_file():
        return Run(p)
    root = Path(submit_root) if submit_root else Path.cwd() / "submit"
    if (root / ref / STATE_FILE).is_file():
        return Run(root / ref)
    raise RunError(f"run '{ref}' not found (looked in {p} and {root / ref})")


def list_runs(submit_root: str | Path | None = None) -> list[Path]:
    """Submit directories under the root (any depth), newest first."""
    root = Path(submit_root) if submit_root else Path.cwd() / "submit"
    if not root.is_dir():
        return []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if STATE_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()  # never walk a run's own logs: a 200,000-job run has 600,000 files there
    return sorted(found, key=lambda d: (d / STATE_FILE).stat().st_mtime, reverse=True)


def _check_budget(cfg: BpsConfig, wf: GenericWorkflow) -> None:
    """A job that can never fit the site is a config error now, not a hang later."""
    site = str(cfg.get("computeSite"))
    cores = site_value(cfg.data, "cores", site=site)
    mem = site_value(cfg.data, "memory", site=site)
    groups = list(wf.groups) + ([] if wf.final is None else [_final_group(wf.final)])
    for g in groups:
        r = g.resources
        if cores is not None and r.request_cpus > cores:
            raise ConfigError(f"job group '{g.name}': requestCpus {r.request_cpus} exceeds site '{site}' cores {cores}")
        if mem is not None and r.request_memory > mem:
            raise ConfigError(
                f"job group '{g.name}': requestMemory {r.request_memory} MB exceeds site '{site}' memory {mem} MB"
            )


def _check_commands(wf: GenericWorkflow, pipeline_path: Path) -> None:
    """Render each command template once (first job of each group) so a typo fails now, not in 10^5 jobs."""
    from batchprod.execution.runner import render_command

    first: dict[int, int] = {}
    for j, g in enumerate(wf.job_group.tolist()):
        first.setdefault(g, j)
    for j in first.values():
        for q in wf.job_spec(j)["quanta"]:
            if q["command"]:
                try:
                    render_command(q["command"], q)
                except (KeyError, AttributeError, IndexError, ValueError) as exc:
                    raise ConfigError(
                        f"{pipeline_path}: key 'tasks.{q['label']}.command': cannot fill the template: "
                        f"{type(exc).__name__}: {exc} (write literal braces as {{{{ and }}}})"
                    ) from None


def _final_group(f: FinalJob) -> Any:
    from batchprod.workflow.generic import JobGroup

    return JobGroup(FinalJob.NAME, (), (), f.resources)


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or ".." in name.split("/"):
        raise ConfigError(f"run name {name!r} may only hold letters, digits, '_', '-', '.', '/'")
    return name


def prepare(
    config_path: str | Path,
    overrides: dict[str, Any] | None = None,
    timings: list[Timing] | None = None,
) -> Run:
    """Validate everything, build graph and workflow, then write the submit directory atomically."""
    timings = timings if timings is not None else []
    t0 = time.perf_counter()
    cfg = load_config(config_path, overrides)
    pipeline_path = cfg.resolve_path("pipelineYaml")
    pipeline = load_pipeline(pipeline_path)
    repo = cfg.resolve_path("repo")
    if not (repo / REGISTRY_FILE).is_file():
        raise ConfigError(f"{cfg.where(cfg.find_raw('repo')[1])}: key 'payload.repo': no {REGISTRY_FILE} in {repo}")
    output_run = _safe_name(str(cfg.get("outputRun")))
    submit_dir = Path(str(cfg.get("submitPath"))).resolve()
    if submit_dir.exists():
        raise RunError(f"{submit_dir}: submit directory already exists (use 'batchprod restart' to continue that run)")
    query = cfg.get("dataQuery", default="")
    timings.append(Timing("load config", time.perf_counter() - t0, _peak_mb()))

    t0 = time.perf_counter()
    registry = Registry(repo / REGISTRY_FILE)
    try:
        in_runs = cfg.typed("inCollection", PAYLOAD_KEYS["inCollection"], default=None)
        unknown = sorted(set(in_runs or []) - set(registry.runs()))
        if unknown:
            _, keypath = cfg.find_raw("inCollection")
            raise ConfigError(f"{cfg.where(keypath)}: key '{keypath}': run '{unknown[0]}' is not in the registry "
                              f"(runs: {', '.join(registry.runs())})")
        qg = build_quantum_graph(pipeline, registry, query, input_runs=in_runs, metadata={"output_run": output_run})
    finally:
        registry.close()
    timings.append(Timing("build quantum graph", time.perf_counter() - t0, _peak_mb()))

    t0 = time.perf_counter()
    run_info = {"repo": str(repo), "output_run": output_run, "submit_dir": str(submit_dir), "name": output_run}
    wf = workflow_from_config(qg, cfg, run_info)
    _check_budget(cfg, wf)
    _check_commands(wf, pipeline_path)
    timings.append(Timing("cluster + workflow", time.perf_counter() - t0, _peak_mb()))

    t0 = time.perf_counter()
    wms = str(cfg.get("wmsServiceClass", Context()))
    from batchprod.wms.base import get_wms

    try:
        get_wms(wms)  # a misspelled or uninstalled WMS is a config error now, before anything is written
    except ConfigError as exc:
        _, keypath = cfg.find_raw("wmsServiceClass")
        raise ConfigError(f"{cfg.where(keypath)}: key '{keypath}': {exc}") from None
    tmp = submit_dir.with_name(f".{submit_dir.name}.preparing")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        shutil.copy(pipeline_path, tmp / "pipeline.yaml")
        qg.save(tmp / QGRAPH_FILE)
        wf.save(tmp / WORKFLOW_FILE)
        (tmp / LOG_DIR).mkdir()
        store = StateStore(tmp / STATE_FILE, create=True)
        names = wf.job_names()
        prio = wf.priorities()
        mem = [g.resources.request_memory for g in wf.groups]
        jobs = (
            {
                "id": j,
                "name": names[j],
                "label": wf.groups[int(wf.job_group[j])].name,
                "n_quanta": int(wf.job_qptr[j + 1] - wf.job_qptr[j]),
                "priority": int(prio[j]),
                "request_memory": mem[int(wf.job_group[j])],
            }
            for j in range(len(wf))
        )
        if wf.final is not None:
            jobs = _chain(jobs, {
                "id": len(wf), "name": FinalJob.NAME, "label": FinalJob.NAME, "n_quanta": 0,
                "priority": wf.final.resources.priority, "request_memory": wf.final.resources.request_memory,
            })
        store.init_run(output_run, str(submit_dir), wms, jobs)
        store.close()
        tmp.rename(submit_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    timings.append(Timing("write submit dir", time.perf_counter() - t0, _peak_mb()))
    run = Run(submit_dir)
    run.__dict__["qgraph"] = qg
    run.__dict__["workflow"] = wf
    return run


def _chain(it: Any, last: dict[str, Any]) -> Any:
    yield from it
    yield last
