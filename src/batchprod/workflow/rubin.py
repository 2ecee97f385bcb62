"""The workflow of a Rubin run, with ctrl_bps's meaning: pipetaskInit first, run-qbb jobs, aggregate-graph last.

* clustering: ``clusterAlgorithm`` single-quantum (the default: the ``cluster`` section must then be
  absent, as ctrl_bps would ignore it) or dimension clustering; a cluster without ``dimensions`` is
  ONE job (ctrl_bps), not "grouped by shared dimensions" as in native files;
* a cluster's own values (``cluster.<name>.requestMemory``, ...) win; what it leaves unset comes from
  its tasks: the largest of each (cpus, memory, retries, multiplier), and for ``requestWalltime`` and
  ``requestDisk`` the sum over the job's quanta (per job: ``GenericWorkflow.job_walltime``, ``job_disk``);
* every job runs one command, the config's ``runQuantumCommand`` searched for its cluster / task,
  ``{qgraphNodeId}`` its quanta's UUIDs and ``{qgraphFile}`` the run's copy of the graph;
* a ``pipetaskInit`` job (``pipetask pre-exec-init-qbb``) before every other, and a final job of the
  ``finalJob.command1..N`` commands (``butler aggregate-graph``) unless ``whenRun: NEVER``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchprod.config import BpsConfig, Context
from batchprod.config.keys import FINAL_COMMAND_RE, RUBIN_CLUSTER_KEYS, RUBIN_FINAL_JOB_KEYS
from batchprod.errors import ConfigError
from batchprod.graph.quantum_graph import QuantumGraph
from batchprod.workflow.clustering import ClusterSpec, cluster_quanta, resource_resolver
from batchprod.workflow.generic import FinalJob, GenericWorkflow, JobGroup, Resources
from batchprod.workflow.overrides import RESOURCE_FIELD

INIT = "pipetaskInit"
DIMENSION_CLUSTERING = "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering"

#: Resources fields of the config keys a cluster may set itself: ours, and ctrl_bps's own
_FIELDS = {**RESOURCE_FIELD, "requestMemoryMax": "memory_limit", "retryUnlessExit": "retry_unless_exit",
           "requestDisk": "request_disk", "preemptible": "preemptible"}


def _clusters(cfg: BpsConfig) -> list[ClusterSpec]:
    section = cfg.data.get("cluster") or {}
    algorithm = str(cfg.get("clusterAlgorithm"))
    if algorithm != DIMENSION_CLUSTERING:
        if section:
            raise ConfigError(f"{cfg.where('cluster')}: key 'cluster': clusters apply only with clusterAlgorithm: "
                              f"{DIMENSION_CLUSTERING} (ctrl_bps would ignore them with {algorithm.rsplit('.', 1)[-1]}); "
                              "set it, or remove the cluster section")
        return []
    out = []
    for name, sub in section.items():
        ctx = Context(cluster=name)
        if "pipetasks" not in sub:
            raise ConfigError(f"{cfg.where(f'cluster.{name}')}: key 'cluster.{name}.pipetasks' is required")
        labels = tuple(cfg.typed("pipetasks", RUBIN_CLUSTER_KEYS["pipetasks"], ctx))
        dims = tuple(cfg.typed("dimensions", RUBIN_CLUSTER_KEYS["dimensions"], ctx)) if "dimensions" in sub else ()
        where = f"{cfg.where(f'cluster.{name}')}: key 'cluster.{name}"
        equal = []
        for pair in cfg.typed("equalDimensions", RUBIN_CLUSTER_KEYS["equalDimensions"], ctx) \
                if "equalDimensions" in sub else []:
            a, sep, b = pair.partition(":")
            if not sep or not a.strip() or not b.strip():
                raise ConfigError(f"{where}.equalDimensions': expected pairs such as 'visit:exposure', got {pair!r}")
            equal.append((a.strip(), b.strip()))
        part = tuple(cfg.typed("partitionDimensions", RUBIN_CLUSTER_KEYS["partitionDimensions"], ctx)) \
            if "partitionDimensions" in sub else ()
        max_clusters = cfg.typed("partitionMaxClusters", RUBIN_CLUSTER_KEYS["partitionMaxClusters"], ctx) \
            if "partitionMaxClusters" in sub else 0
        max_size = cfg.typed("partitionMaxSize", RUBIN_CLUSTER_KEYS["partitionMaxSize"], ctx) \
            if "partitionMaxSize" in sub else 0
        if part and bool(max_clusters) == bool(max_size):
            raise ConfigError(f"{where}': partitionDimensions needs exactly one of partitionMaxClusters or "
                              "partitionMaxSize")
        if (max_clusters or max_size) and not part:
            raise ConfigError(f"{where}': partitionMaxClusters / partitionMaxSize need partitionDimensions")
        out.append(ClusterSpec(name, labels, dims, tuple(equal), part, max_clusters, max_size))
    return out


def _own(cfg: BpsConfig, cluster: str) -> dict[str, Any]:
    """The values a cluster section sets itself (they win over its tasks', as in ctrl_bps)."""
    sub = (cfg.data.get("cluster") or {}).get(cluster) or {}
    table = RUBIN_CLUSTER_KEYS
    out = {}
    for k in sub:
        if k in _FIELDS:
            v = cfg.typed(k, table[k], Context(cluster=cluster))
            out[_FIELDS[k]] = tuple(v) if isinstance(v, list) else v
    return out


def rubin_workflow(qg: QuantumGraph, cfg: BpsConfig, run: dict[str, Any], curvals: dict[str, str]) -> GenericWorkflow:
    """Cluster a Rubin graph into ctrl_bps's jobs. ``curvals``: the values the jobs' commands take for
    ``{qgraphFile}`` (the run's copy) and ``{butlerConfig}`` (the repository's absolute path)."""
    labels = {t.label for t in qg.tasks}
    for label in cfg.data.get("pipetask") or {}:
        if label not in labels and label != INIT:
            raise ConfigError(f"{cfg.where(f'pipetask.{label}')}: key 'pipetask.{label}': the graph has no task "
                              f"'{label}' (tasks: {', '.join(sorted(labels))})")
    clusters = _clusters(cfg)
    by_cluster = {c.name: c for c in clusters}
    resolve = resource_resolver(cfg)
    wf = cluster_quanta(qg, clusters, resolve, None, run)
    # groups: a cluster's own values win over its tasks' combined ones; each group's command
    walltime_by_task = np.array([resolve(t.label, None).request_walltime for t in qg.tasks], dtype=np.int64)
    disk_by_task = np.array([resolve(t.label, None).request_disk for t in qg.tasks], dtype=np.int64)
    groups = []
    own_walltime = np.zeros(len(wf.groups), dtype=bool)
    own_disk = np.zeros(len(wf.groups), dtype=bool)
    for gi, g in enumerate(wf.groups):
        c = by_cluster.get(g.name)
        res, ctx = g.resources, Context(label=g.labels[0])
        if c is not None:
            members = [qg.task_index(lab) for lab in c.labels]
            walltime_by_task[members] = [resolve(lab, c.name).request_walltime for lab in c.labels]
            disk_by_task[members] = [resolve(lab, c.name).request_disk for lab in c.labels]
            own = _own(cfg, c.name)
            own_walltime[gi] = "request_walltime" in own
            own_disk[gi] = "request_disk" in own
            res = Resources(**{**res.__dict__, **own})
            ctx = Context(label=g.labels[0], cluster=c.name) if len(g.labels) == 1 else Context(cluster=c.name)
        groups.append(JobGroup(g.name, g.labels, g.dimensions, res, _with_environment(
            cfg.environment(ctx, curvals), cfg.render("runQuantumCommand", ctx, curvals)), g.equal))
    job_walltime = _summed(wf, qg, walltime_by_task, own_walltime)
    job_disk = _summed(wf, qg, disk_by_task, own_disk)
    init_res = Resources.from_settings(cfg.job_settings(Context(label=INIT)))
    init_ctx = Context(label=INIT)
    init = JobGroup(INIT, (), (), init_res, _with_environment(
        cfg.environment(init_ctx, curvals), cfg.render("runQuantumCommand", init_ctx, curvals)))
    final = _final_job(cfg, curvals)
    return _with_init(wf, groups, init, final, job_walltime, job_disk)


def _summed(wf: GenericWorkflow, qg: QuantumGraph, by_task: np.ndarray, own: np.ndarray) -> np.ndarray | None:
    """Per job, the sum of its quanta's values (ctrl_bps ``requestWalltime`` and ``requestDisk`` of a
    cluster), where its cluster does not set its own; None when no task asks for any."""
    if not by_task.any() or not len(wf):
        return None
    per_quantum = by_task[qg.task_of[wf.job_qidx]]
    sums = np.add.reduceat(per_quantum, wf.job_qptr[:-1]) if len(per_quantum) else np.zeros(len(wf), np.int64)
    sums[own[wf.job_group]] = 0  # the group's own value applies
    return sums.astype(np.int64)


def _with_init(wf: GenericWorkflow, groups: list[JobGroup], init: JobGroup, final: FinalJob | None,
               job_walltime: np.ndarray | None, job_disk: np.ndarray | None) -> GenericWorkflow:
    """Job 0 is pipetaskInit (no quanta); every job that had no parent now has it."""
    n = len(wf)
    job_group = np.concatenate([[len(groups)], wf.job_group]).astype(np.int32)
    job_qptr = np.concatenate([[0], wf.job_qptr])
    n_parents = np.diff(wf.dep_ptr)
    roots = n_parents == 0
    counts = np.concatenate([[0], n_parents + roots])
    dep_ptr = np.zeros(n + 2, dtype=np.int64)
    np.cumsum(counts, out=dep_ptr[1:])
    dep_idx = np.empty(int(dep_ptr[-1]), dtype=np.int32)
    # old parents shift by one; a root's only parent is job 0
    child_of_old = np.repeat(np.arange(n), n_parents)
    pos = dep_ptr[1:-1][child_of_old] + (np.arange(len(wf.dep_idx)) - wf.dep_ptr[:-1][child_of_old])
    dep_idx[pos] = wf.dep_idx + 1
    dep_idx[dep_ptr[1:-1][roots]] = 0
    walltime = None if job_walltime is None else np.concatenate([[0], job_walltime])
    part = None if wf.job_part is None else np.concatenate([[0], wf.job_part])
    disk = None if job_disk is None else np.concatenate([[0], job_disk])
    return GenericWorkflow([*groups, init], job_group, job_qptr, wf.job_qidx, dep_ptr, dep_idx, final, wf.qgraph,
                           wf.run, walltime, part, disk)


def _final_job(cfg: BpsConfig, curvals: dict[str, str]) -> FinalJob | None:
    """ctrl_bps's final job: ``finalJob.command1..N`` in order, its values searched in ``finalJob``
    first (so ``-j {requestCpus}`` is the final job's own)."""
    ctx = Context(section="finalJob")
    when = str(cfg.typed("whenRun", RUBIN_FINAL_JOB_KEYS["whenRun"], ctx))
    if when == "NEVER":
        return None
    names = sorted((k for k in cfg.section_keys("finalJob") if FINAL_COMMAND_RE.fullmatch(k)),
                   key=lambda k: int(k[7:]))
    # {requestCpus} (aggregate-graph -j N) is filled when the job starts, from its resources then: a
    # restart -o finalJob.requestCpus=N or a site's cap reaches the command too
    cur = {**curvals, "requestCpus": "{requestCpus}"}
    commands = [c for c in (cfg.render(k, ctx, cur) for k in names) if c.strip()]
    if not commands:
        raise ConfigError(f"{cfg.where('finalJob')}: key 'finalJob': no command1..N to run (or whenRun: NEVER)")
    env = _with_environment(cfg.environment(ctx, curvals), "").strip()
    return FinalJob(None, "\n".join([env, *commands] if env else commands), when,
                    Resources.from_settings(cfg.job_settings(ctx)), ())


def _with_environment(env: dict[str, str], command: str) -> str:
    """``export NAME="value"; ...`` before the command (double quotes: ``${HOME}`` in a value is the
    job's own, as in ctrl_bps, where environment values are expanded on the node)."""
    parts = []
    for name, value in env.items():
        text = value.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
        parts.append(f'export {name}="{text}"; ')
    return "".join(parts) + command
