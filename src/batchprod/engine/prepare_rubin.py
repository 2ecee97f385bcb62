"""Prepare a Rubin run from a ctrl_bps submit file: the graph is a real ``.qg``, the jobs pipetask's.

As ``bps prepare``: with ``qgraphFile`` the graph is that file (``pipetask update-graph-run`` first
when its output run is not the config's ``outputRun``); without it, ``createQuantumGraph``
(``pipetask qgraph``) builds it from ``pipelineYaml``, ``butlerConfig``, ``inCollection`` and
``dataQuery``. The graph file is copied into the submit directory (every job reads that copy) and
converted once into our compact graph (labels, data IDs, UUIDs, edges: the thin graph only).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from pathlib import Path

from batchprod.config import BpsConfig, Context
from batchprod.config.keys import RUBIN_IGNORED_KEYS
from batchprod.errors import ConfigError, GraphError
from batchprod.state.run import Run

#: the run's copy of the Rubin graph, in its submit directory
RUBIN_QG = "rubin.qg"


def _run_pipetask(cfg: BpsConfig, key: str, curvals: dict[str, str], what: str) -> None:
    """Run a graph command of the config (createQuantumGraph / updateQuantumGraph) on this machine;
    its failure is one line with the command's own last words."""
    cmd = cfg.render(key, Context(), curvals)
    try:
        p = subprocess.run(["/bin/bash", "-c", f"set -euo pipefail\n{cmd}"], capture_output=True, text=True,
                           check=False)
    except OSError as exc:
        raise ConfigError(f"{cfg.where(key)}: key '{key}': cannot run: {exc}") from None
    if p.returncode != 0:
        lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip() and "eups" not in ln]
        last = lines[-1][:300] if lines else "no output"
        raise ConfigError(f"{cfg.where(key)}: key '{key}': {what} failed (exit {p.returncode}): {last}; "
                          f"command: {shlex.join(shlex.split(cmd)[:3])} ...")


def prepare_rubin(cfg: BpsConfig, timings: list, t0: float, existing: str = "refuse") -> Run:  # type: ignore[type-arg]
    from batchprod.engine.prepare import (
        Timing,
        _check_budget,
        _check_wms,
        _discard,
        _make_tmp,
        _opened,
        _peak_mb,
        _safe_name,
        _submit_dir,
        _write_run,
    )
    from batchprod.graph.rubin import read_rubin_qgraph
    from batchprod.workflow.rubin import rubin_workflow

    if existing != "refuse":
        raise ConfigError(f"{cfg.path}: --{existing}-run is for batchprod repositories; a Butler's output run is "
                          f"extended or replaced by pipetask (extraQgraphOptions: --{existing}-run) or given anew "
                          "(payload.outputRun)")
    butler = cfg.resolve_path("butlerConfig")
    output_run = _safe_name(cfg.get("outputRun"), cfg.where(cfg.find_raw("outputRun")[1]))
    submit_dir = _submit_dir(cfg)
    given = cfg.resolve_path("qgraphFile") if cfg.has("qgraphFile") else None
    if given is None:
        cfg.resolve_path("pipelineYaml")
    wms = _check_wms(cfg)
    notes: list[str] = list(cfg.notes)
    timings.append(Timing("load config", time.perf_counter() - t0, _peak_mb()))
    tmp, created = _make_tmp(cfg, submit_dir)
    try:
        t0 = time.perf_counter()
        staged = tmp / RUBIN_QG
        final = submit_dir / RUBIN_QG
        if given is None:
            _run_pipetask(cfg, "createQuantumGraph", {"qgraphFile": str(staged), "butlerConfig": str(butler)},
                          "building the quantum graph (pipetask qgraph)")
            qg = read_rubin_qgraph(staged)
        else:
            qg = read_rubin_qgraph(given)
            if qg.metadata.get("output_run") != output_run:
                # ctrl_bps: a graph made for another output run is rewritten for this one
                _run_pipetask(cfg, "updateQuantumGraph",
                              {"inputQgraphFile": str(given), "qgraphFile": str(staged), "outputRun": output_run,
                               "butlerConfig": str(butler)},
                              f"moving the graph to output run '{output_run}' (pipetask update-graph-run)")
                qg = read_rubin_qgraph(staged)
            else:
                shutil.copyfile(given, staged)
        qg.metadata["qgraph_file"] = str(final)
        timings.append(Timing("read quantum graph" if given is not None else "pipetask qgraph + read",
                              time.perf_counter() - t0, _peak_mb()))

        t0 = time.perf_counter()
        run_info = {"repo": str(butler), "output_run": output_run, "submit_dir": str(submit_dir),
                    "name": output_run, "protocol": "butler", "qgraph_file": str(final)}
        wf = rubin_workflow(qg, cfg, run_info, {"qgraphFile": str(final), "butlerConfig": str(butler)})
        notes.extend(_fit_final_job(cfg, wf))
        _check_budget(cfg, wf)
        timings.append(Timing("cluster + workflow", time.perf_counter() - t0, _peak_mb()))

        t0 = time.perf_counter()
        if cfg.has("pipelineYaml"):
            shutil.copyfile(cfg.resolve_path("pipelineYaml"), tmp / "pipeline.yaml")
        _write_run(cfg, tmp, output_run, wms, qg, wf, [])
        tmp.rename(submit_dir)
    except GraphError as exc:
        _discard(tmp, created)  # nothing left behind: the twin and the directories made for it
        raise ConfigError(str(exc)) from None
    except BaseException:
        _discard(tmp, created)
        raise
    timings.append(Timing("write submit dir", time.perf_counter() - t0, _peak_mb()))
    run = _opened(Path(submit_dir), qg, wf)
    ignored = sorted(k for k in cfg.data if k in RUBIN_IGNORED_KEYS)
    if ignored:  # said, never silent
        notes.append(f"ctrl_bps keys with no effect here (batchprod names its own files): {', '.join(ignored)}")
    out = qg.metadata.get("output")
    if given is not None and out and cfg.has("output") and str(cfg.get("output")) != out:
        notes.append(f"the graph's output collection is '{out}' (aggregate-graph chains the run there, as ctrl_bps "
                     f"does); payload.output '{cfg.get('output')}' applies only when batchprod builds the graph")
    run.notes = notes
    return run


def _fit_final_job(cfg: BpsConfig, wf: object) -> list[str]:
    """ctrl_bps's default final job asks for 16 cores and 32 GB; on a smaller compute site (a laptop) it
    gets what the site has, said in a note. A value the file sets itself is kept (and checked)."""
    import dataclasses

    from batchprod.wms.settings import check_sites, site_capacity

    final = getattr(wf, "final", None)
    if final is None:
        return []
    ctx = Context(section="finalJob")
    settings = check_sites(cfg)
    capacity = site_capacity(settings)
    cores, memory = capacity.cores, capacity.memory_mb
    res, changes = final.resources, {}
    if cores and res.request_cpus > cores and cfg.find_raw("requestCpus", ctx)[1].startswith("<defaults>"):
        changes["request_cpus"] = cores
    if memory and res.request_memory > memory and cfg.find_raw("requestMemory", ctx)[1].startswith("<defaults>"):
        changes["request_memory"] = int(memory)
    if not changes:
        return []
    wf.final = dataclasses.replace(final, resources=dataclasses.replace(res, **changes))  # type: ignore[attr-defined]
    got = ", ".join(f"{k.removeprefix('request_')} {res.__dict__[k]:,} -> {v:,}" for k, v in changes.items())
    return [f"finalJob: ctrl_bps's default resources do not fit site '{settings.site}' ({got}); set "
            "finalJob.requestCpus / finalJob.requestMemory to choose"]
