"""A trace file of a run: one TSV row per attempt of every job, like Nextflow's ``trace.txt``.

Everything comes from one read of the attempt table, one of the job table and the run's workflow
and graph arrays, so a 10^5-attempt run is traced in about a second.

What the state store records about time, and so what the columns mean:

* ``submit``: when the attempt was handed to the backend (the attempt row's ``start``; the
  orchestrator first writes it when it queues the attempt and overwrites it once the backend has
  taken it). The wait for cores and memory in batchprod's own ready queue before that is not
  recorded.
* ``start``: when the payload began running. The local backend spawns its processes when handed
  the attempt, so there it equals ``submit``; a batch backend (Slurm, Parsl, ...) sees the real start
  but does not record it, so the cell is empty there (and for an attempt still queued).
* ``end``: when the orchestrator saw the attempt end.
* ``queue_s`` = start - submit, ``run_s`` = end - start: empty when either end is unknown.

Request values are those the attempt ran with: its recorded memory request (raised after an OOM),
and the cpus and walltime of its job group as of the attempt's submission (``restart -o``
overrides count from the time they were given). ``request_walltime_s`` 0 means unlimited.
An unknown value is an empty cell, never 'None'.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import IO, Any, cast

import numpy as np

from batchprod.errors import RunError
from batchprod.execution.rundir import WORKFLOW_FILE
from batchprod.execution.states import JobState
from batchprod.state.run import Run
from batchprod.workflow import GenericWorkflow
from batchprod.workflow.generic import FinalJob, Resources

COLUMNS = (
    "job", "label", "data_id", "attempt", "status", "class", "exit", "signal", "submit", "start", "end",
    "queue_s", "run_s", "cpu_s", "peak_rss_mb", "request_memory_mb", "request_cpus", "request_walltime_s",
    "host", "site", "stdout", "stderr",
)

#: WMS whose backend starts the payload the moment it is handed an attempt (no scheduler queue)
DIRECT_START_WMS = frozenset({"local", "batchprod.wms.local:LocalService"})

_CLEAN = str.maketrans({"\t": " ", "\n": " ", "\r": " "})
_SIGNALS = {int(s): s.name for s in signal.Signals}


def _text(v: Any) -> str:
    if v is None:
        return ""
    s = str(v)
    return s if s.isprintable() else s.translate(_CLEAN)  # the check is ~10x cheaper than translate


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return format(v, fmt)


def _int(v: Any) -> str:
    return "" if v is None else str(int(v))


def _signal(v: Any) -> str:
    if v is None:
        return ""
    return _SIGNALS.get(int(v), f"SIG{int(v)}")


def iso_times(ts: Sequence[float | None]) -> list[str]:
    """ISO 8601 local times with milliseconds and the UTC offset in force at each instant
    (``2026-11-26T19:40:01.123+01:00``, as ``datetime.astimezone().isoformat('milliseconds')``),
    vectorized: the offset is looked up once per quarter hour, not per value. None gives ''."""
    out = [""] * len(ts)
    idx = [i for i, t in enumerate(ts) if t is not None and math.isfinite(t)]
    if not idx:
        return out
    ms = np.floor(np.array([ts[i] for i in idx], dtype=np.float64) * 1000).astype(np.int64)
    bucket = ms // 900_000  # UTC offsets change on quarter hours
    keys, inv = np.unique(bucket, return_inverse=True)
    offsets = np.zeros(len(keys), dtype=np.int64)
    suffix: list[str | None] = []
    for k, b in enumerate(keys.tolist()):
        first, last = time.localtime(b * 900).tm_gmtoff, time.localtime(b * 900 + 899).tm_gmtoff
        offsets[k] = first
        sign = "+" if first >= 0 else "-"
        suffix.append(f"{sign}{abs(first) // 3600:02d}:{abs(first) % 3600 // 60:02d}" if first == last else None)
    body = np.datetime_as_string((ms + offsets[inv] * 1000).astype("datetime64[ms]"), unit="ms").tolist()
    for i, s, k in zip(idx, body, inv.tolist(), strict=True):
        z = suffix[k]
        if z is None:  # an offset change inside this quarter hour: ask for this instant
            import datetime as dt

            out[i] = dt.datetime.fromtimestamp(cast(float, ts[i])).astimezone().isoformat(timespec="milliseconds")
        else:
            out[i] = s + z
    return out


def job_data_ids(run: Run, job_ids: Sequence[int]) -> dict[int, str]:
    """``visit=1,detector=2`` per job (the group's dimensions of its first quantum, as in the
    failure report), from the workflow and graph arrays, vectorized per (task, group)."""
    wf, qg = run.workflow, run.qgraph
    ids = np.array(sorted({j for j in job_ids if 0 <= j < len(wf)}), dtype=np.int64)
    if not len(ids):
        return {}
    first_q = wf.job_qidx[wf.job_qptr[ids]].astype(np.int64)
    task = qg.task_of[first_q].astype(np.int64)
    group = wf.job_group[ids].astype(np.int64)
    out: dict[int, str] = {}
    pairs = np.unique(np.stack([task, group], axis=1), axis=0)
    for t, g in pairs.tolist():
        sel = (task == t) & (group == g)
        tdims = qg.tasks[t].dimensions
        dims = [d for d in wf.groups[g].dimensions if d in tdims]
        cols = [list(tdims).index(d) for d in dims]
        rows = qg.data_ids[t][first_q[sel] - int(qg.task_offsets[t])][:, cols].tolist()
        if any(d in qg.vocab for d in dims):  # string dimensions: codes -> values
            rows = [[qg.vocab[d][v] if d in qg.vocab else v for d, v in zip(dims, row, strict=True)] for row in rows]
        for j, row in zip(ids[sel].tolist(), rows, strict=True):
            out[j] = ",".join(f"{d}={v}" for d, v in zip(dims, row, strict=True))
    return out


def _resource_epochs(run: Run) -> tuple[list[float], list[tuple[list[Resources], Resources | None]]]:
    """Group (and final job) resources over time: as prepared, then after each ``restart -o``."""
    overrides = run.restart_overrides()
    wf = run.workflow
    if not overrides:
        return [-math.inf], [([g.resources for g in wf.groups], wf.final.resources if wf.final else None)]
    from batchprod.workflow.overrides import apply_overrides

    base = GenericWorkflow.load(run.submit_dir / WORKFLOW_FILE, run.qgraph)
    ns = SimpleNamespace(groups=list(base.groups), final=base.final)
    times = [-math.inf]
    snaps = [([g.resources for g in ns.groups], ns.final.resources if ns.final else None)]
    for entry in overrides:
        apply_overrides(cast(GenericWorkflow, ns), entry.get("values") or {})
        times.append(float(entry.get("time") or 0.0))
        snaps.append(([g.resources for g in ns.groups], ns.final.resources if ns.final else None))
    return times, snaps


def trace_rows(run: Run) -> Iterator[list[str]]:
    """The trace's rows (without the header), in job then attempt order. Everything is read here,
    up front; the iterator only formats."""
    jobs = run.store.jobs()
    attempts = run.store.attempts()
    wf = run.workflow
    n = len(wf)
    job_group = wf.job_group.tolist()
    data_ids = job_data_ids(run, sorted({a["job_id"] for a in attempts}))
    times, snaps = _resource_epochs(run)
    site = _text((run.config or {}).get("computeSite") or "local")
    direct = str(run.store.run_info()["wms"]) in DIRECT_START_WMS

    submits = [a["start"] for a in attempts]
    started = [a["start"] if direct and a["status"] != JobState.QUEUED else None for a in attempts]
    ends = [a["end"] for a in attempts]
    submit_s, start_s, end_s = iso_times(submits), iso_times(started), iso_times(ends)

    def rows() -> Iterator[list[str]]:
        for i, a in enumerate(attempts):
            j = a["job_id"]
            job = jobs[j] if 0 <= j < len(jobs) and jobs[j]["id"] == j else {"name": f"#{j}", "label": ""}
            res_groups, res_final = snaps[bisect_right(times, submits[i] if submits[i] is not None else math.inf) - 1]
            res = res_groups[job_group[j]] if 0 <= j < n else res_final if j == n else None
            st, en = started[i], ends[i]
            failure = a["failure_class"] if a["status"] != JobState.SUCCEEDED else None
            yield [
                _text(job["name"]),
                _text(FinalJob.NAME if j == n else job["label"]),
                _text(data_ids.get(j, "")),
                _int(a["number"]),
                _text(a["status"]),
                _text(failure),
                _int(a["exit_code"]),
                _signal(a["signal"]),
                submit_s[i],
                start_s[i],
                end_s[i],
                _num(st - submits[i], ".3f") if st is not None and submits[i] is not None else "",
                _num(en - st, ".3f") if en is not None and st is not None else "",
                _num(a["cpu_s"], ".3f"),
                _num(a["peak_rss_mb"], ".1f"),
                _int(a["request_memory"] if a["request_memory"] is not None else res.request_memory if res else None),
                _int(res.request_cpus if res else None),
                _int(res.request_walltime if res else None),
                _text(a["host"]),
                _text(a.get("site")) or site,  # runs before revision 0003 did not record it
                _text(a["stdout"]),
                _text(a["stderr"]),
            ]

    return rows()


def write_trace(run: Run, path_or_file: str | Path | IO[str]) -> int:
    """Write the run's trace as TSV (header + one row per attempt) to a path (atomically: a
    half-written trace never replaces a good one), ``-`` for stdout, or an open text file.
    Returns the number of attempt rows."""
    rows = trace_rows(run)
    if not isinstance(path_or_file, str | Path) or str(path_or_file) == "-":
        fh = sys.stdout if isinstance(path_or_file, str | Path) else path_or_file
        return _write(fh, rows)
    path = Path(path_or_file)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            n = _write(fh, rows)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunError(f"{path}: cannot write the trace: {exc.strerror or exc}") from None
    return n


def _write(fh: IO[str], rows: Iterator[list[str]]) -> int:
    fh.write("\t".join(COLUMNS) + "\n")
    n = 0
    buf: list[str] = []
    for row in rows:
        buf.append("\t".join(row))
        n += 1
        if len(buf) >= 10_000:
            fh.write("\n".join(buf) + "\n")
            buf.clear()
    if buf:
        fh.write("\n".join(buf) + "\n")
    fh.flush()
    return n
