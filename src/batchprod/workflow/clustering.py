"""Clustering quanta into jobs, vectorized with numpy (no per-quantum Python work).

* default: one quantum per job;
* a cluster ``{pipetasks: [a, b], dimensions: [visit]}`` puts every quantum of tasks a and b that
  shares the same visit into one job (ctrl_bps ``dimension_clustering``);
* without ``dimensions`` a cluster groups its tasks by the dimensions they all share, which chains
  per-data-ID tasks (calibrate + detect of one (visit, detector) in one job).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchprod.config import BpsConfig, Context
from batchprod.config.keys import CLUSTER_KEYS, FINAL_JOB_KEYS, NAME_RE
from batchprod.config.safe_yaml import one_line
from batchprod.errors import ConfigError, WorkflowError
from batchprod.graph.quantum_graph import QuantumGraph
from batchprod.workflow.generic import FinalJob, GenericWorkflow, JobGroup, Resources


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    labels: tuple[str, ...]
    dimensions: tuple[str, ...] | None = None
    #: ctrl_bps ``equalDimensions``: pairs (a, b) meaning a task's b value stands for a (visit:exposure)
    equal: tuple[tuple[str, str], ...] = ()
    #: ctrl_bps ``partitionDimensions``: split each cluster into parts by these values, at most
    #: ``max_clusters`` jobs for the cluster in all, or at most ``max_size`` values per part
    partition: tuple[str, ...] = ()
    max_clusters: int = 0
    max_size: int = 0


def _column(qg: QuantumGraph, task: Any, d: str, equal: tuple[tuple[str, str], ...], cluster: str) -> int:
    """The column of a task's data IDs that gives dimension ``d`` (itself, or its equal)."""
    if d in task.dimensions:
        return int(task.dimensions.index(d))
    for a, b in equal:
        other = b if a == d else a if b == d else None
        if other is not None and other in task.dimensions:
            if d in qg.vocab or other in qg.vocab:
                raise WorkflowError(f"cluster '{cluster}': equalDimensions {a}:{b} is not supported for string values")
            return int(task.dimensions.index(other))
    raise WorkflowError(f"cluster '{cluster}': task '{task.label}' has no dimension '{d}'")


def _partition_ids(qg: QuantumGraph, c: ClusterSpec, pkeys: np.ndarray, n_cluster_values: int) -> np.ndarray:
    """ctrl_bps's partitioning: the distinct partition values, sorted as ctrl_bps sorts them (their
    text joined by '=='), cut into consecutive parts; returns the part (1-based) of each row."""
    uniq, inverse = np.unique(pkeys, axis=0, return_inverse=True)
    text = ["==".join(str(v) for v in (qg.decode(d, [int(x)])[0] for d, x in zip(c.partition, row, strict=True)))
            for row in uniq.tolist()]
    order = sorted(range(len(text)), key=text.__getitem__)
    if c.max_clusters:
        if n_cluster_values > c.max_clusters:
            raise WorkflowError(f"cluster '{c.name}': partitionMaxClusters ({c.max_clusters}) must be at least the "
                                f"number of cluster dimension values ({n_cluster_values})")
        chunks = c.max_clusters // n_cluster_values
        size, extra = divmod(len(text), chunks)
    else:
        size, extra = c.max_size, 0
    part = np.empty(len(text), dtype=np.int64)
    pid, filled, cap, given = 0, None, size, 0
    for u in order:
        if filled is None or filled >= cap:
            pid, filled, cap = pid + 1, 0, size
            if given < extra:
                cap, given = cap + 1, given + 1
        part[u] = pid
        filled += 1
    return part[inverse.reshape(-1)]


ResourceResolver = Callable[[str | None, str | None], Resources]


def _csr(keys: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Group values by integer key in [0, n): (ptr, values sorted by key, stable)."""
    order = np.argsort(keys, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n), out=ptr[1:])
    return ptr, values[order]


def cluster_quanta(
    qg: QuantumGraph,
    clusters: Sequence[ClusterSpec],
    resolve: ResourceResolver,
    final: FinalJob | None = None,
    run: dict[str, Any] | None = None,
) -> GenericWorkflow:
    """Turn a quantum graph into a generic workflow; raises WorkflowError on a bad cluster."""
    labels = [t.label for t in qg.tasks]
    owner: dict[str, ClusterSpec] = {}
    for c in clusters:
        if not c.labels:
            raise WorkflowError(f"cluster '{c.name}': 'pipetasks' lists no task")
        for lab in c.labels:
            if lab not in labels:
                raise WorkflowError(f"cluster '{c.name}': unknown task label '{lab}' (pipeline has: {', '.join(labels)})")
            if lab in owner:
                raise WorkflowError(f"task '{lab}' is in two clusters: '{owner[lab].name}' and '{c.name}'")
            owner[lab] = c

    n = len(qg)
    job_of = np.empty(n, dtype=np.int64)
    job_part: np.ndarray | None = None  # per job, its part of a partitioned cluster (1-based)
    groups: list[JobGroup] = []
    group_of_job: list[np.ndarray] = []
    next_job = 0
    done: set[str] = set()
    for t_idx, task in enumerate(qg.tasks):
        if task.label in done:
            continue
        lo, hi = int(qg.task_offsets[t_idx]), int(qg.task_offsets[t_idx + 1])
        c = owner.get(task.label)
        if c is None:
            # one quantum per job
            count = hi - lo
            job_of[lo:hi] = np.arange(next_job, next_job + count)
            groups.append(JobGroup(task.label, (task.label,), task.dimensions, resolve(task.label, None)))
            group_of_job.append(np.full(count, len(groups) - 1, dtype=np.int32))
            next_job += count
            done.add(task.label)
            continue
        members = [qg.tasks[qg.task_index(lab)] for lab in c.labels]
        if c.dimensions is None:
            dims = tuple(d for d in members[0].dimensions if all(d in m.dimensions for m in members))
        else:
            dims = c.dimensions
        all_dims = (*dims, *c.partition)
        idx_parts, key_parts = [], []
        for m in members:
            ti = qg.task_index(m.label)
            block = qg.data_ids[ti]
            cols = [_column(qg, m, d, c.equal, c.name) for d in all_dims]
            key_parts.append(block[:, cols] if cols else np.zeros((len(block), 0), dtype=np.int64))
            idx_parts.append(np.arange(int(qg.task_offsets[ti]), int(qg.task_offsets[ti + 1])))
        keys = np.concatenate(key_parts) if key_parts else np.zeros((0, len(all_dims)), dtype=np.int64)
        idx = np.concatenate(idx_parts)
        if c.partition and len(idx):
            n_values = len(np.unique(keys[:, : len(dims)], axis=0)) if dims else 1
            part = _partition_ids(qg, c, keys[:, len(dims):], n_values)
            keys = np.concatenate([keys[:, : len(dims)], part[:, None]], axis=1)
        if len(idx):
            if keys.shape[1]:
                _, inverse = np.unique(keys, axis=0, return_inverse=True)
                inverse = inverse.reshape(-1)
            else:
                inverse = np.zeros(len(idx), dtype=np.int64)
            count = int(inverse.max()) + 1
            job_of[idx] = next_job + inverse
            res = Resources.combine([resolve(lab, c.name) for lab in c.labels])
            groups.append(JobGroup(c.name, c.labels, dims, res, equal=c.equal))
            if c.partition:
                if job_part is None:
                    job_part = np.zeros(n, dtype=np.int32)  # (jobs <= quanta)
                job_part[next_job + inverse] = keys[:, -1]
            group_of_job.append(np.full(count, len(groups) - 1, dtype=np.int32))
            next_job += count
        done.update(c.labels)

    n_jobs = next_job
    job_group = np.concatenate(group_of_job) if group_of_job else np.zeros(0, dtype=np.int32)
    qidx = np.arange(n, dtype=np.int32)
    job_qptr, job_qidx = _csr(job_of, qidx, n_jobs)

    prod, cons = qg.edges()
    jp, jc = job_of[prod], job_of[cons]
    keep = jp != jc
    pairs = np.unique(jc[keep] * n_jobs + jp[keep]) if n_jobs else np.zeros(0, dtype=np.int64)
    dep_child, dep_parent = pairs // max(n_jobs, 1), pairs % max(n_jobs, 1)
    dep_ptr = np.zeros(n_jobs + 1, dtype=np.int64)
    np.cumsum(np.bincount(dep_child, minlength=n_jobs), out=dep_ptr[1:])
    wf = GenericWorkflow(groups, job_group, job_qptr, job_qidx, dep_ptr, dep_parent.astype(np.int32), final, qg, run or {},
                         job_part=None if job_part is None else job_part[:n_jobs])
    if clusters:
        wf.topological_order()  # a cluster can only introduce a cycle when clusters exist
    return wf


def clusters_from_config(cfg: BpsConfig) -> list[ClusterSpec]:
    out = []
    for name, section in (cfg.data.get("cluster") or {}).items():
        ctx = Context(cluster=name)
        if "pipetasks" not in section:
            raise ConfigError(f"{cfg.where(f'cluster.{name}')}: key 'cluster.{name}.pipetasks' is required")
        labels = tuple(cfg.typed("pipetasks", CLUSTER_KEYS["pipetasks"], ctx))
        dims = tuple(cfg.typed("dimensions", CLUSTER_KEYS["dimensions"], ctx)) if "dimensions" in section else None
        out.append(ClusterSpec(name, labels, dims))
    return out


def final_job_from_config(cfg: BpsConfig) -> FinalJob | None:
    section = cfg.data.get("finalJob")
    if not section:
        return None
    vals: dict[str, Any] = {}
    for k, conv in FINAL_JOB_KEYS.items():
        if k in section:
            try:
                vals[k] = conv(cfg._substitute(section[k], f"finalJob.{k}", Context(), (k,)))
            except ValueError as exc:
                raise ConfigError(f"{cfg.where(f'finalJob.{k}')}: key 'finalJob.{k}': {exc}") from None
    if bool(vals.get("python")) == bool(vals.get("command")):
        raise ConfigError(f"{cfg.where('finalJob')}: key 'finalJob': give exactly one of 'python' or 'command'")
    base = cfg.job_settings(Context())
    base.update({k: v for k, v in vals.items() if k in base})
    outputs = tuple(vals.get("outputs", ()))
    where = f"{cfg.where('finalJob.outputs')}: key 'finalJob.outputs'"
    stems: dict[str, str] = {}
    for o in outputs:
        parts = o.split("/")
        if not o.strip() or o.endswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in o:
            raise ConfigError(f"{where}: '{o}' must be a file path inside the output run (no empty part, "
                              "'.', '..', leading or trailing '/')")
        stem = os.path.splitext(parts[-1])[0]
        if not stem:
            raise ConfigError(f"{where}: '{o}' has no file name (its stem names the dataset type)")
        if not NAME_RE.fullmatch(stem) or not re.fullmatch(r"[A-Za-z0-9_.\-/]+", o):
            raise ConfigError(f"{where}: {one_line(o, 80)!r}: the stem names a dataset type ({NAME_RE.pattern}) "
                              "and the path may hold only letters, digits and _ . - /")
        if stem in stems:
            raise ConfigError(f"{where}: '{o}' and '{stems[stem]}' have one stem '{stem}' (the stem is the dataset "
                              "type: make them differ)")
        stems[stem] = o
    return FinalJob(vals.get("python"), vals.get("command"), vals.get("whenRun", "ALWAYS"), Resources.from_settings(base),
                    outputs)


def resource_resolver(cfg: BpsConfig) -> ResourceResolver:
    """Resources of a (task label, cluster) from the config's search order, looked up once each."""
    cache: dict[tuple[str | None, str | None], Resources] = {}

    def resolve(label: str | None, cluster: str | None) -> Resources:
        key = (label, cluster)
        if key not in cache:
            cache[key] = Resources.from_settings(cfg.job_settings(Context(label=label, cluster=cluster)))
        return cache[key]

    return resolve


def workflow_from_config(qg: QuantumGraph, cfg: BpsConfig, run: dict[str, Any]) -> GenericWorkflow:
    """Cluster a graph with the config's clusters, resources and final job."""
    return cluster_quanta(qg, clusters_from_config(cfg), resource_resolver(cfg), final_job_from_config(cfg), run)
