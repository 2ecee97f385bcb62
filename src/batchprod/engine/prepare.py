"""Prepare: validate everything, build the graph and the workflow, write the submit directory.

A submit directory is assembled under a temporary name and renamed into place only when complete,
so a bad input or a crash during prepare leaves nothing half-written behind.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batchprod._time import iso_now
from batchprod.config import BpsConfig, Context, load_config
from batchprod.config.keys import PAYLOAD_KEYS
from batchprod.errors import ConfigError, RunError
from batchprod.execution.rundir import (
    CONFIG_FILE,
    HISTORY_FILE,
    LOG_DIR,
    QGRAPH_FILE,
    REGISTRY_FILE,
    WORKFLOW_FILE,
)
from batchprod.graph import QuantumGraph, Registry, build_quantum_graph
from batchprod.pipeline import check_config_labels, load_pipeline
from batchprod.state.run import Run
from batchprod.state.store import create_store
from batchprod.workflow import GenericWorkflow, workflow_from_config
from batchprod.workflow.generic import FinalJob


@dataclass
class Timing:
    """Seconds and peak memory of one prepare stage (logged like ctrl_bps's stage timers)."""

    stage: str
    seconds: float
    peak_mb: float


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check_budget(cfg: BpsConfig, wf: GenericWorkflow) -> None:
    """Every site section against its WMS plugin's settings (unknown keys, bad values: one line), and
    a job that can never fit the compute site is a config error now, not a hang later."""
    from batchprod.wms.settings import check_sites

    settings = check_sites(cfg)
    site = settings.site
    cores = getattr(settings, "cores", None)
    mem = getattr(settings, "memory", None) or None  # 0: this machine's
    groups = list(wf.groups) + ([] if wf.final is None else [_final_group(wf.final)])
    for g in groups:
        r = g.resources
        if cores is not None and r.request_cpus > cores:
            raise ConfigError(f"{_job_key(cfg, g, 'requestCpus')}: job group '{g.name}': requestCpus "
                              f"{r.request_cpus} exceeds site '{site}' cores {cores}")
        if mem is not None and r.request_memory > mem:
            raise ConfigError(f"{_job_key(cfg, g, 'requestMemory')}: job group '{g.name}': requestMemory "
                              f"{r.request_memory} MB exceeds site '{site}' memory {mem} MB")


def _job_key(cfg: BpsConfig, g: Any, key: str) -> str:
    """'<file>: key '<where the group's value comes from>'' for a resource error."""
    if g.name == FinalJob.NAME:
        ctx = Context(section="finalJob")
    elif g.labels and (cfg.data.get("cluster") or {}).get(g.name) is not None:
        ctx = Context(label=g.labels[0], cluster=g.name)
    else:
        ctx = Context(label=g.labels[0] if g.labels else g.name)
    _, keypath = cfg.find_raw(key, ctx)
    return f"{cfg.where(keypath) if not keypath.startswith('<defaults>') else cfg.path}: key '{keypath}'"


def _check_commands(wf: GenericWorkflow, pipeline_path: Path) -> None:
    """Render each command template once (first job of each group) so a typo fails now, not in 10^5 jobs."""
    from batchprod.execution.commands import render_command

    first: dict[int, int] = {}
    for j, g in enumerate(wf.job_group.tolist()):
        first.setdefault(g, j)
    for j in first.values():
        for q in wf.job_spec(j)["quanta"]:
            if q["command"]:
                try:
                    render_command(q["command"], q)
                except (KeyError, AttributeError, IndexError, ValueError) as exc:
                    hint = "" if "placeholder" in str(exc) else " (write literal braces as {{ and }})"
                    raise ConfigError(
                        f"{pipeline_path}: key 'tasks.{q['label']}.command': cannot fill the template: "
                        f"{type(exc).__name__}: {exc}{hint}"
                    ) from None


def _submit_dir(cfg: BpsConfig) -> Path:
    """The new run's submit directory; a path the filesystem cannot take is a config error, not a crash,
    and one that exists already is another run's."""
    raw = str(cfg.get("submitPath"))
    where = f"{cfg.where(cfg.find_raw('submitPath')[1])}: key 'submitPath'"
    try:
        p = Path(raw).resolve()
        p.exists()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: unusable path {raw[:80]!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if any(len(part.encode()) > 255 for part in p.parts) or len(str(p).encode()) > 4000:
        raise ConfigError(f"{where}: path too long ({len(str(p)):,} characters)")
    if p.exists():
        raise RunError(f"{p}: submit directory already exists (use 'batchprod restart' to continue that run)")
    return p


def _check_final_outputs(cfg: BpsConfig, wf: GenericWorkflow, qg: QuantumGraph) -> None:
    """A final-job output is a dataset type named by its stem: it must not shadow a pipeline's."""
    if wf.final is None:
        return
    types = {dt for t in qg.tasks for dt in (*t.inputs, *t.outputs)}
    for o in wf.final.outputs:
        stem = os.path.splitext(os.path.basename(o))[0]
        if stem in types:
            raise ConfigError(f"{cfg.where('finalJob.outputs')}: key 'finalJob.outputs': '{o}' would be dataset type "
                              f"'{stem}', which the pipeline already has; rename the file")


def _final_group(f: FinalJob) -> Any:
    from batchprod.workflow.generic import JobGroup

    return JobGroup(FinalJob.NAME, (), (), f.resources)


#: names an output run may not take: they are files of the repository itself
_RESERVED_RUNS = frozenset({REGISTRY_FILE, f"{REGISTRY_FILE}-wal", f"{REGISTRY_FILE}-shm", f"{REGISTRY_FILE}-journal"})


def _safe_name(value: Any, where: str) -> str:
    """An output run name: relative path segments of a safe character set, inside the repository."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{where}: key 'payload.outputRun' is empty: give a run name such as u/me/run1")
    name = str(value)
    parts = name.split("/")
    if (len(name) > 200 or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", name) or name in _RESERVED_RUNS or parts[0] == "_staging"):
        raise ConfigError(f"{where}: key 'payload.outputRun': {name[:80]!r} is not a usable run name (relative "
                          "path segments of letters, digits, '_', '-', '.', no '.' or '..' segment, at most 200 "
                          "characters, not a repository file)")
    return name


#: what prepare does when the output run already holds datasets
EXISTING_RUN = ("refuse", "extend", "replace")


def _check_output_run(registry: Registry, repo: Path, output_run: str, in_runs: list[str] | None,
                      existing: str, where: str, reads: Sequence[str] = ()) -> set[tuple[str, str]]:
    """A finished output run is never overwritten by accident, nor is anything else: an input run
    (given in payload.inCollection, or holding a dataset type the pipeline reads) is never an output
    run, and no run's output area holds another run's. Returns the datasets it holds (for extend)."""
    key = f"{where}: key 'payload.outputRun'"
    if in_runs and output_run in in_runs:
        raise ConfigError(f"{key}: '{output_run}' is also an input run "
                          "(payload.inCollection): a run cannot read and write the same collection")
    area = repo
    for part in output_run.split("/"):
        area = area / part
        if area.exists() and not area.is_dir():
            raise ConfigError(f"{key}: '{output_run}': its output area would be under {area}, which is a file")
    held = registry.run_datasets(output_run)
    read = sorted({t for t, _ in held} & set(reads))
    if read:
        raise ConfigError(f"{key}: '{output_run}' holds {read[0]} datasets, which this pipeline reads: an input "
                          "run is never an output run (extending or replacing it would write over or remove inputs)")
    inside = sorted(r for r in registry.runs() if r.startswith(output_run + "/") or output_run.startswith(r + "/"))
    if inside:
        other = inside[0]
        how = "inside its output area" if other.startswith(output_run + "/") else "whose output area holds it"
        raise ConfigError(f"{key}: '{output_run}' would share files with run '{other}' ({how}): give a run "
                          "that is neither a parent nor a child of another run")
    files = area.is_dir() and any(area.iterdir())
    if existing == "refuse" and (held or files):
        what = f"holds {len(held):,} datasets in {repo / REGISTRY_FILE}" if held else f"has files in {area}"
        raise ConfigError(f"{where}: key 'payload.outputRun': output run '{output_run}' already {what}; "
                          "give a new outputRun, or --extend-run (only new data IDs run) or --replace-run "
                          "(its datasets and files are removed first)")
    return held


def _replace_output_run(repo: Path, output_run: str, submit_dir: Path) -> str:
    """--replace-run: remove the old run's registry rows and its output area; recorded in the new run."""
    registry = Registry(repo / REGISTRY_FILE)
    try:
        n = registry.remove_run(output_run)
    finally:
        registry.close()
    area = repo / output_run
    n_files = sum(len(f) for _, _, f in os.walk(area)) if area.is_dir() else 0
    shutil.rmtree(area, ignore_errors=True)
    note = (f"{iso_now()} --replace-run: removed {n:,} datasets of '{output_run}' "
            f"from the registry and {n_files:,} files under {area}\n")
    with open(submit_dir / HISTORY_FILE, "a") as fh:
        fh.write(note)
    return note.strip()


def _already_done(qg: QuantumGraph, wf: GenericWorkflow, held: set[tuple[str, str]], repo: str,
                  output_run: str) -> list[int]:
    """--extend-run: jobs whose every output is already registered in the output run."""
    from batchprod.graph.registry import canonical

    if not held:
        return []
    done = []
    for j in range(len(wf)):
        if all((r.dataset_type, canonical(r.data_id)) in held
               for q in wf.quanta(j) for r in qg.outputs(int(q), repo, output_run)):
            done.append(j)
    return done


def prepare(
    config_path: str | Path,
    overrides: dict[str, Any] | None = None,
    timings: list[Timing] | None = None,
    existing: str = "refuse",
) -> Run:
    """Validate everything, build graph and workflow, then write the submit directory atomically.

    ``existing``: an output run that already holds datasets is refused, extended (jobs whose outputs
    are all registered there are not run) or replaced (its rows and files removed first)."""
    timings = timings if timings is not None else []
    t0 = time.perf_counter()
    cfg = load_config(config_path, overrides)
    if cfg.rubin:
        from batchprod.engine.prepare_rubin import prepare_rubin

        return prepare_rubin(cfg, timings, t0, existing)
    pipeline_path = cfg.resolve_path("pipelineYaml")
    pipeline = load_pipeline(pipeline_path)
    check_config_labels(cfg, pipeline)  # pipetask.<label> / cluster pipetasks name real tasks
    repo = cfg.resolve_path("repo")
    if not (repo / REGISTRY_FILE).is_file():
        raise ConfigError(f"{cfg.where(cfg.find_raw('repo')[1])}: key 'payload.repo': no {REGISTRY_FILE} in {repo}")
    output_run = _safe_name(cfg.get("outputRun"), cfg.where(cfg.find_raw("outputRun")[1]))
    submit_dir = _submit_dir(cfg)
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
        held = _check_output_run(registry, repo, output_run, in_runs, existing, cfg.where(cfg.find_raw("outputRun")[1]),
                                 pipeline.overall_inputs())
        qg = build_quantum_graph(pipeline, registry, query, input_runs=in_runs, metadata={"output_run": output_run})
    finally:
        registry.close()
    timings.append(Timing("build quantum graph", time.perf_counter() - t0, _peak_mb()))

    t0 = time.perf_counter()
    run_info = {"repo": str(repo), "output_run": output_run, "submit_dir": str(submit_dir), "name": output_run}
    wf = workflow_from_config(qg, cfg, run_info)
    _check_budget(cfg, wf)
    _check_final_outputs(cfg, wf, qg)
    done = _already_done(qg, wf, held, str(repo), output_run) if existing == "extend" else []
    _check_commands(wf, pipeline_path)
    timings.append(Timing("cluster + workflow", time.perf_counter() - t0, _peak_mb()))

    t0 = time.perf_counter()
    wms = _check_wms(cfg)
    tmp, created = _make_tmp(cfg, submit_dir)
    try:
        shutil.copyfile(pipeline_path, tmp / "pipeline.yaml")  # not copy: our umask, not the source's mode
        _write_run(cfg, tmp, output_run, wms, qg, wf, done)
        if existing == "replace":
            _replace_output_run(repo, output_run, tmp)
        tmp.rename(submit_dir)
    except BaseException:
        _discard(tmp, created)
        raise
    timings.append(Timing("write submit dir", time.perf_counter() - t0, _peak_mb()))
    run = _opened(submit_dir, qg, wf)
    run.notes = list(cfg.notes)  # what the config's reading noticed (prepare prints them)
    return run


def _opened(submit_dir: Path, qg: QuantumGraph, wf: GenericWorkflow) -> Run:
    run = Run(submit_dir)
    run.__dict__["qgraph"] = qg
    run.__dict__["workflow"] = wf
    return run


def _check_wms(cfg: BpsConfig) -> str:
    """The run's WMS: a misspelled or uninstalled one is a config error now, before anything is written."""
    from batchprod.wms.registry import get_wms

    wms = str(cfg.get("wmsServiceClass", Context()))
    try:
        get_wms(wms)
    except ConfigError as exc:
        _, keypath = cfg.find_raw("wmsServiceClass")
        raise ConfigError(f"{cfg.where(keypath)}: key '{keypath}': {exc}") from None
    return wms


def _make_tmp(cfg: BpsConfig, submit_dir: Path) -> tuple[Path, list[Path]]:
    """The submit directory's temporary twin, renamed into place only when complete, and the directories
    above it that this call created (deepest first): a failed prepare removes them again (:func:`_discard`)."""
    tmp = submit_dir.with_name(f".{submit_dir.name}.preparing")
    created: list[Path] = []
    parent = tmp.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        _discard(tmp, created)
        raise ConfigError(f"{cfg.where(cfg.find_raw('submitPath')[1])}: key 'submitPath': cannot create "
                          f"{submit_dir}: {exc.strerror or exc}") from None
    return tmp, created


def _discard(tmp: Path, created: list[Path]) -> None:
    """A failed prepare leaves nothing: its temporary twin, then the directories it created above it,
    each only while empty (another prepare may have put its run there meanwhile)."""
    shutil.rmtree(tmp, ignore_errors=True)
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (or gone): it and everything above it stay


def _write_run(cfg: BpsConfig, tmp: Path, output_run: str, wms: str, qg: QuantumGraph, wf: GenericWorkflow,
               done: list[int]) -> None:
    """Config, graph, workflow, log directory and the state store's jobs, into the temporary twin."""
    submit_dir = tmp.with_name(tmp.name.removeprefix(".").removesuffix(".preparing"))
    (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    qg.save(tmp / QGRAPH_FILE)
    wf.save(tmp / WORKFLOW_FILE)
    (tmp / LOG_DIR).mkdir()
    store = create_store(tmp, output_run)  # tmp/state.db, or the central database (--db)
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
    if done:
        now = time.time()
        store.write([{"id": j, "status": "SUCCEEDED", "attempts": 0, "retries": 0, "preemptions": 0,
                      "infra_failures": 0, "request_memory": mem[int(wf.job_group[j])], "failure_class": None,
                      "exit_code": None, "updated": now,
                      "message": "not run: its outputs are already in the output run (--extend-run)"}
                     for j in done], [], [])
    store.close()


def _chain(it: Any, last: dict[str, Any]) -> Any:
    yield from it
    yield last
