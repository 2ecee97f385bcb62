"""The generic workflow: jobs (clusters of quanta) with resources, dependencies and a final job.

Columnar like the quantum graph: a job is an index; its quanta, parents and resource group are array
slices. Resources are resolved once per *group* (a task label or a cluster), never per job, so a
million jobs cost one config lookup per label.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from batchprod._arrayfile import ArrayFileError, check_csr, check_index, int_array, load_arrays, save_arrays
from batchprod.errors import WorkflowError
from batchprod.graph.quantum_graph import QuantumGraph

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Resources:
    """What a job asks for and how it is retried (ctrl_bps key names in the config)."""

    request_cpus: int = 1
    request_memory: int = 2048  # MB
    request_walltime: int = 0  # seconds, 0 = unlimited
    priority: int = 0
    number_of_retries: int = 0
    memory_multiplier: float = 1.0
    memory_limit: int = 0  # MB, 0 = site memory
    max_preemptions: int = 3
    infra_retry_delay: float = 10.0  # seconds, doubled per infrastructure failure
    max_infra_retries: int = 8
    #: exit codes never retried (ctrl_bps ``retryUnlessExit``: a usage error will not mend itself)
    retry_unless_exit: tuple[int, ...] = ()
    request_disk: int = 0  # MB, 0 = not asked (ctrl_bps ``requestDisk``)
    preemptible: bool = True  # may run on an opportunistic site (ctrl_bps ``preemptible``)

    @classmethod
    def from_settings(cls, s: dict[str, Any]) -> Resources:
        return cls(
            request_cpus=s["requestCpus"],
            request_memory=s["requestMemory"],
            request_walltime=s["requestWalltime"],
            priority=s["priority"],
            number_of_retries=s["numberOfRetries"],
            memory_multiplier=s["memoryMultiplier"],
            max_preemptions=s["maxPreemptions"],
            infra_retry_delay=s["infraRetryDelay"],
            max_infra_retries=s["maxInfraRetries"],
            retry_unless_exit=tuple(s.get("retryUnlessExit") or ()),
            request_disk=s.get("requestDisk") or 0,
            preemptible=s.get("preemptible", True) is not False,
            # ctrl_bps: requestMemoryMax caps the memory a retry may ask for (else memoryLimit)
            memory_limit=s.get("requestMemoryMax") or s["memoryLimit"],
        )

    @staticmethod
    def combine(items: list[Resources]) -> Resources:
        """Resources of a job running several tasks one after another: the largest of each (a job
        is preemptible only if all its tasks are; an exit code never retried for one is for all)."""
        out = {f: max(getattr(r, f) for r in items) for f in Resources.__dataclass_fields__}
        out["retry_unless_exit"] = tuple(sorted({c for r in items for c in r.retry_unless_exit}))
        out["preemptible"] = all(r.preemptible for r in items)
        return Resources(**out)


@dataclass(frozen=True)
class JobGroup:
    """Jobs that share a name prefix, task labels, key dimensions and resources."""

    name: str
    labels: tuple[str, ...]
    dimensions: tuple[str, ...]
    resources: Resources
    #: a Rubin job's command (``{qgraphNodeId}`` filled per job); "" for native jobs (their tasks' commands)
    command: str = ""
    #: ctrl_bps equalDimensions: (a, b) pairs, a task's b value stands for dimension a (job names too)
    equal: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FinalJob:
    """Runs after every other job: e.g. merge catalogs or ingest outputs."""

    python: str | None
    command: str | None
    when_run: str  # ALWAYS | SUCCESS
    resources: Resources = field(default_factory=Resources)
    #: files it writes under ``<repo>/<outputRun>/``: checked, checksummed and recorded like any output
    #: (dataset type = the file's stem, no dimensions), so they have provenance and are ingested
    outputs: tuple[str, ...] = ()

    NAME = "finalJob"

    def output_refs(self, repo: str, run: str) -> list[dict[str, Any]]:
        return [{"dataset_type": os.path.splitext(os.path.basename(o))[0], "data_id": {},
                 "path": os.path.join(repo, run, o), "checksum": None} for o in self.outputs]


@dataclass(frozen=True)
class JobView:
    """A read-only view of one job, built on demand."""

    index: int
    name: str
    group: JobGroup
    quanta: np.ndarray
    parents: np.ndarray

    @property
    def resources(self) -> Resources:
        return self.group.resources


class GenericWorkflow:
    """Jobs as arrays: group per job, quanta per job (CSR), parent jobs per job (CSR)."""

    def __init__(
        self,
        groups: list[JobGroup],
        job_group: np.ndarray,
        job_qptr: np.ndarray,
        job_qidx: np.ndarray,
        dep_ptr: np.ndarray,
        dep_idx: np.ndarray,
        final: FinalJob | None,
        qgraph: QuantumGraph,
        run: dict[str, Any],
        job_walltime: np.ndarray | None = None,
        job_part: np.ndarray | None = None,
        job_disk: np.ndarray | None = None,
    ) -> None:
        self.groups = groups
        self.job_group = np.asarray(job_group, dtype=np.int32)
        self.job_qptr = np.asarray(job_qptr, dtype=np.int64)
        self.job_qidx = np.asarray(job_qidx, dtype=np.int32)
        self.dep_ptr = np.asarray(dep_ptr, dtype=np.int64)
        self.dep_idx = np.asarray(dep_idx, dtype=np.int32)
        self.final = final
        self.qgraph = qgraph
        #: run-level facts every job needs: repo, output run, submit dir, run name (and for Rubin
        #: runs: protocol "butler", the Butler, the graph file)
        self.run = dict(run)
        #: seconds per job where a cluster sums its quanta's walltimes (ctrl_bps); None: the groups'
        self.job_walltime = None if job_walltime is None else np.asarray(job_walltime, dtype=np.int64)
        #: per job, its part of a partitioned cluster (ctrl_bps partitionDimensions; 0: none); None: no parts
        self.job_part = None if job_part is None else np.asarray(job_part, dtype=np.int32)
        #: MB of scratch disk per job where a cluster sums its quanta's (ctrl_bps requestDisk); None: the groups'
        self.job_disk = None if job_disk is None else np.asarray(job_disk, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.job_group)

    @property
    def n_dependencies(self) -> int:
        return len(self.dep_idx)

    def quanta(self, j: int) -> np.ndarray:
        return self.job_qidx[self.job_qptr[j] : self.job_qptr[j + 1]]

    def parents(self, j: int) -> np.ndarray:
        return self.dep_idx[self.dep_ptr[j] : self.dep_ptr[j + 1]]

    @cached_property
    def _children(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        consumer = np.repeat(np.arange(n, dtype=np.int32), np.diff(self.dep_ptr))
        order = np.argsort(self.dep_idx, kind="stable")
        ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.dep_idx, minlength=n), out=ptr[1:])
        return ptr, consumer[order]

    def children(self, j: int) -> np.ndarray:
        ptr, idx = self._children
        return idx[ptr[j] : ptr[j + 1]]

    def children_csr(self) -> tuple[np.ndarray, np.ndarray]:
        return self._children

    def group(self, j: int) -> JobGroup:
        return self.groups[int(self.job_group[j])]

    def job_name(self, j: int) -> str:
        """Readable and unique: group name + the job's key dimension values."""
        g = self.group(j)
        if not g.dimensions:
            return g.name
        did = self.qgraph.data_id(int(self.job_qidx[self.job_qptr[j]]))
        for a, b in g.equal:  # a quantum with the equal dimension names the job by it
            did.setdefault(a, did.get(b))
            did.setdefault(b, did.get(a))
        key = "_".join(f"{d}{did[d]}" for d in g.dimensions)
        if self.job_part is not None and self.job_part[j]:
            key = f"{key}_{int(self.job_part[j]):03}" if key else f"{int(self.job_part[j]):03}"
        return f"{g.name}_{key}" if key else g.name

    def job_names(self) -> list[str]:
        return [self.job_name(j) for j in range(len(self))]

    def job(self, j: int) -> JobView:
        return JobView(j, self.job_name(j), self.group(j), self.quanta(j), self.parents(j))

    def priorities(self) -> np.ndarray:
        return np.array([g.resources.priority for g in self.groups], dtype=np.int64)[self.job_group]

    def job_spec(self, j: int) -> dict[str, Any]:
        """Everything the job wrapper needs to run job j (JSON-serializable)."""
        if self.run.get("protocol") == "butler":
            return self._butler_spec(j)
        repo, run = self.run["repo"], self.run["output_run"]
        qg = self.qgraph
        quanta = []
        for q in self.quanta(j):
            q = int(q)
            task = qg.tasks[int(qg.task_of[q])]
            quanta.append(
                {
                    "node_id": qg.node_id(q),
                    "label": task.label,
                    "data_id": qg.data_id(q),
                    "python": task.python,
                    "command": task.command,
                    "config": task.config or {},
                    "inputs": [r.to_dict() for r in qg.inputs(q, repo, run)],
                    "outputs": [r.to_dict() for r in qg.outputs(q, repo, run)],
                }
            )
        return {"name": self.job_name(j), "repo": repo, "output_run": run, "quanta": quanta}

    def _butler_spec(self, j: int) -> dict[str, Any]:
        """A Rubin job: one command for all its quanta (their UUIDs in ``{qgraphNodeId}``, sorted as
        ctrl_bps does); its quanta carry no files of ours, only what provenance records."""
        qg = self.qgraph
        quanta = []
        for q in self.quanta(j):
            q = int(q)
            task = qg.tasks[int(qg.task_of[q])]
            quanta.append({"node_id": qg.node_id(q), "label": task.label,
                           "data_id": qg.data_id(q), "inputs": [], "outputs": [], "datasets": list(task.outputs)})
        ids = ",".join(sorted(q["node_id"] for q in quanta))
        return {"name": self.job_name(j), "repo": self.run["repo"], "output_run": self.run["output_run"],
                "protocol": "butler", "command": self.group(j).command.replace("{qgraphNodeId}", ids),
                "quanta": quanta}

    def final_spec(self) -> dict[str, Any] | None:
        if self.final is None:
            return None
        return {
            "name": FinalJob.NAME,
            "repo": self.run["repo"],
            "output_run": self.run["output_run"],
            "final": {"python": self.final.python,
                      "command": self.final.command if self.run.get("protocol") != "butler" or not self.final.command
                      else self.final.command.replace("{requestCpus}", str(self.final.resources.request_cpus)),
                      "outputs": [] if self.run.get("protocol") == "butler"
                      else self.final.output_refs(self.run["repo"], self.run["output_run"])},
            "quanta": [],
        }

    def topological_order(self) -> np.ndarray:
        """Kahn over job arrays; raises WorkflowError naming a group on a cycle."""
        n = len(self)
        indeg = np.diff(self.dep_ptr).tolist()
        ptr, idx = self._children
        ptr_l, idx_l = ptr.tolist(), idx.tolist()
        ready = [j for j in range(n) if indeg[j] == 0]
        order: list[int] = []
        while ready:
            j = ready.pop()
            order.append(j)
            for c in idx_l[ptr_l[j] : ptr_l[j + 1]]:
                indeg[c] -= 1
                if indeg[c] == 0:
                    ready.append(c)
        if len(order) != n:
            stuck = sorted({self.group(j).name for j in range(n) if indeg[j] > 0})
            raise WorkflowError(
                f"clustering creates a cycle among jobs of: {', '.join(stuck)} "
                "(a cluster must not contain tasks with an unclustered task between them)"
            )
        return np.array(order, dtype=np.int64)

    # -- persistence --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        header = {
            "format": "batchprod-workflow",
            "version": FORMAT_VERSION,
            "groups": [
                {"name": g.name, "labels": list(g.labels), "dimensions": list(g.dimensions),
                 "resources": asdict(g.resources), **({"command": g.command} if g.command else {}),
                 **({"equal": [list(p) for p in g.equal]} if g.equal else {})}
                for g in self.groups
            ],
            "final": None
            if self.final is None
            else {
                "python": self.final.python,
                "command": self.final.command,
                "when_run": self.final.when_run,
                "resources": asdict(self.final.resources),
                "outputs": list(self.final.outputs),
            },
            "run": self.run,
        }
        arrays = {
            "job_group": self.job_group,
            "job_qptr": self.job_qptr,
            "job_qidx": self.job_qidx,
            "dep_ptr": self.dep_ptr,
            "dep_idx": self.dep_idx,
        }
        if self.job_walltime is not None:
            arrays["job_walltime"] = self.job_walltime
        if self.job_part is not None:
            arrays["job_part"] = self.job_part
        if self.job_disk is not None:
            arrays["job_disk"] = self.job_disk
        save_arrays(path, header, arrays)

    @classmethod
    def load(cls, path: str | Path, qgraph: QuantumGraph) -> GenericWorkflow:
        """Read a workflow file for ``qgraph``; a damaged or tampered one (truncated arrays, indices
        out of range, a bad header) is one WorkflowError naming the file. Vectorized checks."""
        try:
            header, a = load_arrays(path)
        except OSError as exc:
            raise WorkflowError(f"{path}: cannot read workflow: {exc.strerror or exc}") from None
        except ArrayFileError as exc:
            raise WorkflowError(f"{path}: cannot read workflow: {exc}") from None
        if header.get("format") != "batchprod-workflow" or header.get("version") != FORMAT_VERSION:
            raise WorkflowError(f"{path}: not a batchprod workflow of version {FORMAT_VERSION}")
        try:
            groups = [
                JobGroup(g["name"], tuple(g["labels"]), tuple(g["dimensions"]), _resources(g["resources"]),
                         g.get("command", ""), tuple((str(a), str(b)) for a, b in g.get("equal", [])))
                for g in header["groups"]
            ]
            f = header["final"]
            final = None if f is None else FinalJob(f["python"], f["command"], f["when_run"], _resources(f["resources"]),
                                                    tuple(f.get("outputs", ())))
            run = header["run"]
            if not (isinstance(run, dict) and isinstance(run.get("repo"), str) and isinstance(run.get("output_run"), str)):
                raise ArrayFileError("bad header (run)")
            for g in groups:
                if not all(isinstance(x, str) for x in (g.name, *g.labels, *g.dimensions, g.command)):
                    raise ArrayFileError(f"bad header (group {g.name!r})")
            if final is not None and (not all(isinstance(x, str | None) for x in (final.python, final.command))
                                      or final.when_run not in ("ALWAYS", "SUCCESS")
                                      or not all(isinstance(o, str) for o in final.outputs)):
                raise ArrayFileError("bad header (final job)")
            job_group = int_array(a, "job_group")
            n = len(job_group)
            check_index(job_group, len(groups), "job_group", "job groups")
            # every job runs at least one quantum (its name and data ID come from the first), except
            # a Rubin run's pipetaskInit job (a group of no task)
            check_csr(int_array(a, "job_qptr"), int_array(a, "job_qidx"), n, len(qgraph), ("job_qptr", "job_qidx"),
                      "quanta in the graph")
            empty = np.flatnonzero(np.diff(a["job_qptr"]) == 0)
            if len(empty) and any(groups[int(g)].labels for g in np.unique(job_group[empty])):
                raise ArrayFileError(f"job {int(empty[0])} runs no quantum")
            check_csr(int_array(a, "dep_ptr"), int_array(a, "dep_idx"), n, n, ("dep_ptr", "dep_idx"), "jobs")
            walltime, disk = a.get("job_walltime"), a.get("job_disk")
            for name, arr in (("job_walltime", walltime), ("job_disk", disk)):
                if arr is not None and (len(arr) != n or arr.dtype.kind != "i" or (n and int(arr.min()) < 0)):
                    raise ArrayFileError(f"bad {name}")
            part = a.get("job_part")
            if part is not None and (len(part) != n or part.dtype.kind != "i"):
                raise ArrayFileError("bad job_part")
        except ArrayFileError as exc:
            raise WorkflowError(f"{path}: damaged workflow: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise WorkflowError(f"{path}: damaged workflow: bad header ({type(exc).__name__}: {exc})") from None
        return cls(groups, job_group, a["job_qptr"], a["job_qidx"], a["dep_ptr"], a["dep_idx"], final, qgraph, run,
                   walltime, part, disk)


def _resources(d: Any) -> Resources:
    d = dict(d)
    codes = d.pop("retry_unless_exit", [])
    if not isinstance(codes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
        raise ArrayFileError(f"bad header (resource retry_unless_exit = {codes!r})")
    r = Resources(**d, retry_unless_exit=tuple(codes))
    for k, v in asdict(r).items():
        if k == "retry_unless_exit":
            continue
        if k == "preemptible":
            if not isinstance(v, bool):
                raise ArrayFileError(f"bad header (resource {k} = {v!r})")
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise ArrayFileError(f"bad header (resource {k} = {v!r})")
    return r
