"""Per-dataset provenance records and lineage, assembled from what a run already keeps.

Nothing here is written per job: the quantum graph (which task on which data ID read what), the
workflow (which job ran which quanta), the state store (the attempt that succeeded, its host, resource
use and context; every published output with size and checksum) and the frozen config together
answer "where did this file come from" for any output, at query time. The only thing recorded for
provenance on the hot path is the attempt's context hash (see :mod:`batchprod.execution.capture`).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from batchprod.errors import QueryError, RunError
from batchprod.execution.commands import render_command
from batchprod.execution.protocol import FINAL_NODE, file_checksum
from batchprod.execution.rundir import CONFIG_FILE
from batchprod.execution.states import JobState
from batchprod.graph.quantum_graph import DatasetRef
from batchprod.graph.registry import canonical
from batchprod.state.run import Run
from batchprod.workflow.generic import FinalJob

UPSTREAM, DOWNSTREAM = "up", "down"


def _value(v: str) -> int | str:
    """A data ID value: an integer, or a string (Rubin's ``instrument=Cam``; quotes optional)."""
    v = v.strip()
    try:
        return int(v)
    except ValueError:
        return v.strip("'\"")


def parse_dataset(ref: str) -> tuple[str | None, str | None, dict[str, int | str] | None]:
    """``path`` or ``TYPE:dim=value,dim=value`` -> (absolute path, dataset type, data ID)."""
    head, sep, tail = ref.partition(":")
    if sep and "=" in tail and "/" not in head:
        pairs = [kv.split("=", 1) for kv in tail.split(",")]
        if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
            raise QueryError(f"dataset '{ref}': expected TYPE:dim=value,dim=value")
        return None, head, {k.strip(): _value(v) for k, v in pairs}
    return os.path.abspath(ref), None, None


class Provenance:
    """Provenance queries over one run. Lookups are batched: a lineage walk over thousands of
    datasets costs a few queries, not one per dataset."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.qg = run.qgraph
        self.wf = run.workflow
        self.repo, self.out_run = self.wf.run["repo"], self.wf.run["output_run"]

    # -- finding things ---------------------------------------------------------------------------
    def output_row(self, ref: str) -> dict[str, Any]:
        path, dataset_type, data_id = parse_dataset(ref)
        if path is not None:
            rows = self.run.store.find_outputs(path=path)
        else:
            rows = self.run.store.find_outputs(dataset_type=dataset_type, data_id=canonical(data_id or {}))
        if not rows:
            raise RunError(f"run '{self.run.name}': no published output '{ref}' (not produced, or not yet)")
        return rows[-1]

    def quantum_of(self, job_id: int, node_id: str) -> int:
        for q in self.wf.quanta(job_id):
            if self.qg.node_id(int(q)) == node_id:
                return int(q)
        raise RunError(f"run '{self.run.name}': quantum {node_id} is not in job {job_id} (workflow changed?)")

    @cached_property
    def _job_of(self) -> np.ndarray:
        """Quantum index -> job index: the workflow's job -> quanta CSR inverted once."""
        job_of = np.empty(len(self.qg), dtype=np.int64)
        job_of[self.wf.job_qidx] = np.repeat(np.arange(len(self.wf)), np.diff(self.wf.job_qptr))
        return job_of

    def producer(self, q: int) -> int:
        """The job that ran quantum q."""
        return int(self._job_of[q])

    # -- records ----------------------------------------------------------------------------------
    def _succeeded_attempt(self, job_id: int) -> dict[str, Any] | None:
        done = [a for a in self.run.store.attempts(job_id=job_id) if a["status"] == JobState.SUCCEEDED]
        return done[-1] if done else None

    def _butler_inputs(self, q: int) -> list[dict[str, Any]]:
        """A Rubin quantum's inputs: what its predecessor quanta made of the types it reads (by their
        node ids and jobs), and the types it reads from the Butler's input collections."""
        task = self.qg.tasks[int(self.qg.task_of[q])]
        made: set[str] = set()
        out = []
        for p in self.qg.predecessors(q).tolist():
            ptask = self.qg.tasks[int(self.qg.task_of[p])]
            for dt in sorted(set(ptask.outputs) & set(task.inputs)):
                made.add(dt)
                out.append({"dataset_type": dt, "data_id": self.qg.data_id(p), "path": f"butler:{self.repo}#{self.out_run}",
                            "checksum": None, "node_id": self.qg.node_id(p), "produced_by": self.wf.job_name(self.producer(p))})
        inputs = ", ".join(self.qg.metadata.get("inputs") or []) or "its input collections"
        for dt in sorted(set(task.inputs) - made):
            out.append({"dataset_type": dt, "data_id": {}, "path": f"butler:{self.repo}", "checksum": None,
                        "produced_by": f"Butler ({inputs})"})
        return out

    def _inputs(self, q: int) -> list[dict[str, Any]]:
        if self.wf.run.get("protocol") == "butler":
            return self._butler_inputs(q)
        refs: list[DatasetRef] = self.qg.inputs(q, self.repo, self.out_run)
        produced = self.run.store.outputs_by_path(r.path for r in refs)
        out = []
        for r in refs:
            row = produced.get(r.path)
            if row is not None:
                out.append({"dataset_type": r.dataset_type, "data_id": r.data_id, "path": r.path,
                            "checksum": row["checksum"], "size": row["size"],
                            "produced_by": self.wf.job_name(int(row["job_id"]))})
            else:
                out.append({"dataset_type": r.dataset_type, "data_id": r.data_id, "path": r.path,
                            "checksum": r.checksum, "produced_by": "registry"})
        return out

    def _task_part(self, row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
        """(task, data ID, inputs) of the quantum that made an output; for a final-job output, the final
        job (it runs after every other job and may read any of them: its inputs are not itemized)."""
        if row["node_id"] == FINAL_NODE:
            final = self.wf.final
            assert final is not None
            return ({"label": FinalJob.NAME, "python": final.python, "command_template": final.command,
                     "command": final.command, "config": {}}, {}, [])
        q = self.quantum_of(int(row["job_id"]), row["node_id"])
        task = self.qg.tasks[int(self.qg.task_of[q])]
        data_id = self.qg.data_id(q)
        inputs = self._inputs(q)
        quantum = {"label": task.label, "data_id": data_id, "inputs": inputs, "config": task.config or {},
                   "outputs": [r.to_dict() for r in self.qg.outputs(q, self.repo, self.out_run)]}
        return ({"label": task.label, "python": task.python, "command_template": task.command,
                 "command": _rendered(task.command, quantum) if task.command else None,
                 "config": task.config or {}}, data_id, inputs)

    def record(self, ref: str, verify: bool = False) -> dict[str, Any]:
        """Everything known about how one output came to be."""
        row = self.output_row(ref)
        job_id = int(row["job_id"])
        task, data_id, inputs = self._task_part(row)
        attempt = self._succeeded_attempt(job_id) or {}
        contexts = self.run.store.contexts([attempt.get("context") or ""])
        job_name = FinalJob.NAME if row["node_id"] == FINAL_NODE else self.wf.job_name(job_id)
        rec: dict[str, Any] = {
            "dataset": {"dataset_type": row["dataset_type"], "data_id": data_id, "path": row["path"],
                        "size": row["size"], "checksum": row["checksum"]},
            "run": {"name": self.run.name, "submit_dir": str(self.run.submit_dir), "output_run": self.out_run,
                    "config": _file_digest(self.run.submit_dir / CONFIG_FILE),
                    "pipeline": self._pipeline_digest()},
            "task": task,
            "quantum": {"node_id": row["node_id"], "data_id": data_id},
            "job": {"name": job_name, "attempt": attempt.get("number"),
                    "host": attempt.get("host"), "start": attempt.get("start"), "end": attempt.get("end"),
                    "wall_s": attempt.get("wall_s"), "cpu_s": attempt.get("cpu_s"),
                    "peak_rss_mb": attempt.get("peak_rss_mb"), "request_memory_mb": attempt.get("request_memory"),
                    "exit_code": attempt.get("exit_code"), "stdout": attempt.get("stdout"),
                    "stderr": attempt.get("stderr")},
            "context": contexts.get(attempt.get("context") or ""),
            "inputs": inputs,
        }
        if verify:
            rec["verify"] = verify_checksums([rec["dataset"], *inputs])
        return rec

    def _pipeline_digest(self) -> dict[str, Any]:
        """The run's pipeline file; a Rubin run built from a .qg has none: its graph (tasks and their
        configs are in it) stands for it."""
        path = self.run.submit_dir / "pipeline.yaml"
        if not path.exists() and self.wf.run.get("protocol") == "butler":
            path = self.run.submit_dir / "rubin.qg"
        return _file_digest(path)

    # -- lineage ----------------------------------------------------------------------------------
    def lineage(self, ref: str, direction: str = UPSTREAM) -> dict[str, Any]:
        """Every quantum upstream (what it was made from, back to registry inputs) or downstream
        (what was made from it) of one output, in dependency order, with its job and outputs."""
        row = self.output_row(ref)
        if row["node_id"] == FINAL_NODE:
            raise RunError(f"'{ref}' was written by the final job, which follows the whole run: ask for the "
                           "lineage of a job's output instead")
        start = self.quantum_of(int(row["job_id"]), row["node_id"])
        seen = {start}
        todo = deque([start])
        step = self.qg.predecessors if direction == UPSTREAM else self.qg.successors
        while todo:
            for n in step(todo.popleft()):
                n = int(n)
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        if direction == DOWNSTREAM:
            seen.discard(start)
        # quanta are numbered task by task in the pipeline's dependency order, so index order is a
        # topological order: no sort of the whole graph per query
        outs = {q: self.qg.outputs(q, self.repo, self.out_run) for q in sorted(seen)}
        published = self.run.store.outputs_by_path(r.path for refs in outs.values() for r in refs)
        quanta = []
        registry: dict[str, dict[str, Any]] = {}
        for q, refs in outs.items():
            quanta.append({
                "label": self.qg.label(q), "data_id": self.qg.data_id(q), "node_id": self.qg.node_id(q),
                "job": self.wf.job_name(self.producer(q)),
                "outputs": [{"dataset_type": r.dataset_type, "path": r.path,
                             "checksum": (published.get(r.path) or {}).get("checksum"),
                             "published": r.path in published}
                            for r in refs],
            })
            if direction == UPSTREAM:
                for r in self.qg.registry_inputs(q, self.repo):
                    registry[r.path] = r.to_dict()
        return {"dataset": row["path"], "direction": direction, "quanta": quanta,
                "registry_inputs": list(registry.values())}


def verify_checksums(datasets: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Re-read each file and compare with its recorded checksum (``ok``, ``changed``, ``missing``,
    ``unrecorded``; ``in-butler`` for a Butler's dataset, not batchprod's to read): provenance an
    operator can check, not only read."""
    out = []
    for d in datasets:
        path, want = d["path"], d.get("checksum")
        if path.startswith("butler:"):  # a Butler's dataset: the Butler's own to check (butler query-datasets)
            status = "in-butler"
        elif not Path(path).is_file():
            status = "missing"
        elif not want:
            status = "unrecorded"
        else:
            status = "ok" if file_checksum(path) == want else "changed"
        out.append({"path": path, "status": status})
    return out


def _rendered(template: str, quantum: dict[str, Any]) -> str:
    """The command as run; for a run prepared before a template rule was tightened, the template."""
    try:
        return render_command(template, quantum)
    except (ValueError, KeyError, AttributeError, IndexError):
        return template


def _file_digest(path: Path) -> dict[str, Any]:
    """Digest of a file of the run (frozen config, pipeline); never read through a link leaving it."""
    from batchprod.execution.paths import OutsideRunError, open_in

    try:
        with open_in(path.parent, path) as fh:
            data = fh.read()
    except (OSError, OutsideRunError):
        return {"path": str(path), "sha256": None}
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest()}


def _did(d: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def render_record(rec: dict[str, Any]) -> str:
    """A record as a few readable lines (``--json`` gives all of it)."""
    d, t, j, ctx = rec["dataset"], rec["task"], rec["job"], rec.get("context") or {}
    what = t["python"] or t["command"] or ""
    lines = [
        f"dataset   {d['dataset_type']} {_did(d['data_id'])}  {d['path']}",
        f"          {d['size']} bytes  {d['checksum']}" if d.get("size") is not None
        else f"          in the Butler (quantum {rec['quantum']['node_id']})",
        f"task      {t['label']}  {what}".rstrip(),
        f"job       {j['name']} attempt {j['attempt']} on {j['host']}  wall {_num(j['wall_s'])} s  "
        f"cpu {_num(j['cpu_s'])} s  peak {_num(j['peak_rss_mb'])} MB (asked {j['request_memory_mb']} MB)",
        f"software  python {ctx.get('python')}  "
        + "  ".join(f"{k} {v}" for k, v in sorted((ctx.get("packages") or {}).items())),
        f"config    {rec['run']['config']['path']} sha256:{(rec['run']['config']['sha256'] or '')[:16]}",
        f"inputs    {len(rec['inputs'])}",
    ]
    lines += ["  " + "  ".join(x for x in (f"{i['dataset_type']} {_did(i['data_id'])}".strip(), i["checksum"],
                                            f"<- {i['produced_by']}") if x) for i in rec["inputs"]]
    for v in rec.get("verify", []):
        lines.append(f"verify    {v['status']:<10} {v['path']}")
    return "\n".join(lines)


def render_lineage(lin: dict[str, Any]) -> str:
    n = len(lin["quanta"])
    head = (f"made by {n} quanta (its producer and everything upstream)" if lin["direction"] == UPSTREAM
            else f"read by {n} downstream quanta")
    lines = [f"{lin['dataset']}: {head}"]
    lines += [f"  {q['label']:<16} {_did(q['data_id']):<28} job {q['job']}" for q in lin["quanta"]]
    if lin["registry_inputs"]:
        lines.append(f"  from {len(lin['registry_inputs'])} registry datasets")
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def to_prov_json(rec: dict[str, Any]) -> dict[str, Any]:
    """A record as W3C PROV-JSON: the dataset and its inputs are entities, the job attempt that made it
    an activity (``used`` each input, ``wasGeneratedBy`` for the output), the software context and the
    task are agents. Entities are named by checksum where there is one: the same bytes, the same id."""

    def ent(d: dict[str, Any]) -> str:
        return f"bp:{d['checksum'] or 'path:' + d['path']}"

    j, t, d = rec["job"], rec["task"], rec["dataset"]
    act = f"bp:attempt/{rec['run']['name']}/{j['name']}/{j['attempt']}"
    entities = {ent(d): {"prov:type": "bp:Dataset", "bp:datasetType": d["dataset_type"], "bp:path": d["path"],
                         "bp:dataId": canonical(d["data_id"]), "bp:size": d["size"]}}
    for i in rec["inputs"]:
        entities.setdefault(ent(i), {"prov:type": "bp:Dataset", "bp:datasetType": i["dataset_type"],
                                     "bp:path": i["path"], "bp:dataId": canonical(i["data_id"])})
    ctx = rec.get("context") or {}
    agents = {f"bp:task/{t['label']}": {"prov:type": "prov:SoftwareAgent", "bp:payload": t["python"] or t["command"]},
              f"bp:host/{j['host']}": {"prov:type": "bp:Host", "bp:python": ctx.get("python"),
                                       "bp:packages": canonical(ctx.get("packages") or {})}}
    activity = {"prov:type": "bp:JobAttempt", "bp:job": j["name"], "bp:host": j["host"],
                "bp:wallSeconds": j["wall_s"], "bp:cpuSeconds": j["cpu_s"], "bp:peakRssMb": j["peak_rss_mb"]}
    activity = {k: v for k, v in activity.items() if v is not None}  # PROV has no null (prov 3.3 refuses it)
    for key, value in (("prov:startTime", j["start"]), ("prov:endTime", j["end"])):
        if value is not None:
            activity[key] = _iso(value)
    return {
        "prefix": {"bp": "https://batchprod.dev/ns#"},
        "entity": entities,
        "activity": {act: activity},
        "agent": agents,
        "wasGeneratedBy": {"_:gen": {"prov:entity": ent(d), "prov:activity": act}},
        "used": {f"_:use{n}": {"prov:activity": act, "prov:entity": ent(i)} for n, i in enumerate(rec["inputs"])},
        "wasAssociatedWith": {f"_:assoc{n}": {"prov:activity": act, "prov:agent": a} for n, a in enumerate(agents)},
    }


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()
