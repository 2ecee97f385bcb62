"""HTCondor DAGMan export: a DAG plus one submit description per job group, for ``condor_submit_dag``.

Validated here, not run: HTCondor daemons cannot be installed on our machines, so the tests parse
every submit description with the ``htcondor2`` bindings, evaluate the ClassAd expressions with
``classad2`` and check the DAG's structure. Run it on a real pool with
``condor_submit_dag <submit dir>/htcondor/<run>.dag``.

What the export compiles from the generic workflow and the retry policy:

* one submit file per job group (task label or cluster), not per job: a node passes its job index
  through ``VARS``; the job wrapper (``python -m batchprod.execution.runner --submit-dir``) reads its
  own spec from the run's workflow file, so 10^6 jobs do not mean 10^6 files;
* ``RETRY`` (``numberOfRetries``), ``PRIORITY``, ``CATEGORY`` per group with ``MAXJOBS`` (the site's
  ``maxJobs``), a ``FINAL`` node for the final job;
* memory growth: ``request_memory`` is an expression over ``NumJobStarts``
  (``requestMemory x memoryMultiplier^starts``, capped by ``memoryLimit``); a job that goes over its
  memory (HTCondor hold code 34, or the wrapper's OOM exit code) is held and ``periodic_release``
  lets it run again with the larger request while starts remain; ``periodic_remove`` ends it when
  they do not;
* walltime: ``allowed_execute_duration``.

The compute site's typed settings (:mod:`batchprod.wms.settings`, substituted) give ``maxJobs`` and the
memory cap (``memory``) when that site's plugin declares them; the export itself adds no site keys.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

from batchprod.execution.protocol import EXIT_MEMORY_ERROR
from batchprod.state.run import Run
from batchprod.wms.settings import run_config, settings_for
from batchprod.workflow.generic import FinalJob, JobGroup, Resources

HOLD_MEMORY_CODE = 34  # HTCondor's "memory usage exceeded request"


def _memory_expr(r: Resources, site_memory: int) -> str:
    if r.memory_multiplier <= 1.0:
        return str(r.request_memory)
    cap = r.memory_limit or site_memory
    return (f"ifthenelse(isUndefined(NumJobStarts) || NumJobStarts == 0, {r.request_memory}, "
            f"min({{int({r.request_memory} * pow({r.memory_multiplier}, NumJobStarts)), {cap}}}))")


def _oom_held() -> str:
    return (f"(HoldReasonCode =?= {HOLD_MEMORY_CODE} || "
            f"(HoldReasonCode =?= 3 && HoldReasonSubCode =?= {EXIT_MEMORY_ERROR}))")


def submit_description(run: Run, group: JobGroup | None, resources: Resources, site_memory: int, final: bool = False) -> str:
    """The submit file of one job group (or of the final job)."""
    sd = run.submit_dir
    label = FinalJob.NAME if final else group.name if group else "job"
    r = resources
    args = f"-m batchprod.execution.runner --submit-dir {sd}"
    args += " --final" if final else " --job-index $(jobIndex)"
    args += " --attempt $(Cluster)"
    starts = r.number_of_retries + 1
    cap = r.memory_limit or site_memory
    lines = [
        f"# batchprod job group '{label}' of run {run.name}",
        "universe = vanilla",
        f"executable = {sys.executable}",
        f"arguments = \"{args}\"",
        f"output = {sd}/logs/{label}/$(jobName).$(Cluster).out",
        f"error = {sd}/logs/{label}/$(jobName).$(Cluster).err",
        f"log = {sd}/htcondor/run.log",
        "getenv = True",
        f"environment = \"BATCHPROD_JOB=$(jobName) BATCHPROD_SUBMIT_DIR={sd}\"",
        f"request_cpus = {r.request_cpus}",
        f"request_memory = {_memory_expr(r, site_memory)}",
        f"+BatchprodRun = {_quote(run.name)}",
        "+BatchprodJob = \"$(jobName)\"",
        # the wrapper's own OOM verdict holds the job, like HTCondor's memory policy does
        f"on_exit_hold = ExitCode =?= {EXIT_MEMORY_ERROR}",
        "on_exit_hold_reason = \"batchprod: payload exceeded its memory request\"",
        f"on_exit_hold_subcode = {EXIT_MEMORY_ERROR}",
        f"periodic_release = {_oom_held()} && NumJobStarts < {starts} && RequestMemory < {cap}",
        f"periodic_remove = (JobStatus == 5) && {_oom_held()} && (NumJobStarts >= {starts} || RequestMemory >= {cap})",
    ]
    if r.request_walltime:
        lines.append(f"allowed_execute_duration = {r.request_walltime}")
    lines.append("queue")
    return "\n".join(lines) + "\n"


def _quote(s: str) -> str:
    return '"' + s.replace('"', "'") + '"'


def dag_lines(run: Run, max_jobs: int | None, sub_dir: Path) -> Iterator[str]:
    """The DAG file, streamed (a million nodes never build one big string)."""
    wf = run.workflow
    names = wf.job_names()
    yield f"# batchprod run {run.name}: {len(wf)} jobs; submit with condor_submit_dag"
    for j in range(len(wf)):
        g = wf.group(j)
        n = names[j]
        yield f"JOB {n} {sub_dir}/{g.name}.sub"
        yield f'VARS {n} jobIndex="{j}" jobName="{n}"'
        if g.resources.number_of_retries:
            yield f"RETRY {n} {g.resources.number_of_retries}"
        if g.resources.priority:
            yield f"PRIORITY {n} {g.resources.priority}"
        yield f"CATEGORY {n} {g.name}"
    ptr, idx = wf.children_csr()
    for j in range(len(wf)):
        kids = idx[ptr[j] : ptr[j + 1]]
        if len(kids):
            yield f"PARENT {names[j]} CHILD " + " ".join(names[int(c)] for c in kids)
    if max_jobs:
        for g in wf.groups:
            yield f"MAXJOBS {g.name} {max_jobs}"
    if wf.final is not None:
        yield f"FINAL {FinalJob.NAME} {sub_dir}/{FinalJob.NAME}.sub"
        yield f'VARS {FinalJob.NAME} jobName="{FinalJob.NAME}"'


def export_dag(run: Run) -> Path:
    """Write ``<submit dir>/htcondor/run.dag`` and its submit files; returns the DAG path."""
    out = run.submit_dir / "htcondor"
    out.mkdir(exist_ok=True)
    settings = settings_for(run_config(run))
    site_memory = getattr(settings, "memory", None) or 1 << 20
    max_jobs = getattr(settings, "max_jobs", None)
    wf = run.workflow
    for g in wf.groups:
        (out / f"{g.name}.sub").write_text(submit_description(run, g, g.resources, site_memory))
    if wf.final is not None:
        (out / f"{FinalJob.NAME}.sub").write_text(
            submit_description(run, None, wf.final.resources, site_memory, final=True))
    dag = out / "run.dag"
    tmp = dag.with_suffix(".dag.tmp")
    with open(tmp, "w") as fh:
        for line in dag_lines(run, max_jobs, out):
            fh.write(line + "\n")
    tmp.replace(dag)
    (out / "README").write_text(
        "Generated by batchprod; validated (parsed with htcondor2), not run here.\n"
        f"Submit on an HTCondor pool with: condor_submit_dag {shlex.quote(str(dag))}\n")
    return dag


__all__ = ["export_dag", "submit_description"]
