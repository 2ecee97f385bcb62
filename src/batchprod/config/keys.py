"""The key table: every key a submit YAML may hold, where, and of which type.

One table drives unknown-key detection (with "did you mean"), type checks and documentation, so the
schema cannot drift from the code that reads it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Converter = Callable[[Any], Any]


#: Upper bounds: far above any real request, far below what overflows a scheduler, SQLite or numpy.
MAX_CPUS = 4096
MAX_MEMORY_MB = 2**26  # 64 TiB
MAX_WALLTIME_S = 366 * 86400
MAX_RETRIES = 1000
MAX_PRIORITY = 2**31 - 1
MAX_DELAY_S = 86400.0
MAX_POLL_S = 3600.0
MAX_MULTIPLIER = 100.0
MAX_COUNT = 10**7
MAX_DIGITS = 20

#: A task label, cluster name or dataset type: safe in a file name, a DAG line and a log path.
NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
#: Names batchprod itself uses for a job group.
RESERVED_NAMES = frozenset({"finalJob"})
#: A WMS: an entry-point name (local, slurm, ...) or 'package.module:Class'.
WMS_CLASS_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*(?::[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)?")
#: A Python payload: 'package.module:function' (the function may be 'Class.method').
PYTHON_REF_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")
#: Keys run by a shell at job time: ``${ENV}`` in them is left for that shell (never baked in at load).
SHELL_KEYS = frozenset({"finalJob.command"})


def _show(v: Any) -> str:
    from batchprod.config.safe_yaml import show

    return show(v)


def check_name(name: Any, what: str = "name") -> str:
    """A label / cluster name / dataset type name, or ValueError saying what a name may hold."""
    s = name if isinstance(name, str) else None
    if s is None or not NAME_RE.fullmatch(s):
        raise ValueError(
            f"{what} {_show(name)} must start with a letter and hold at most 64 letters, digits, '_' or '-'"
        )
    if s in RESERVED_NAMES:
        raise ValueError(f"{what} '{s}' is reserved")
    return s


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        if len(v.strip().lstrip("-")) > MAX_DIGITS:
            raise ValueError(f"number too large: {_show(v)}")
        return int(v)
    raise ValueError(f"expected an integer, got {_show(v)}")


def _int_in(lo: int, hi: int, what: str) -> Converter:
    def conv(v: Any) -> int:
        i = _int(v)
        if i < lo:
            raise ValueError(f"expected {what}, got {_show(v)}")
        if i > hi:
            raise ValueError(f"expected {what} <= {hi}, got {_show(v)}")
        return i

    return conv


_int_any = _int_in(-MAX_PRIORITY, MAX_PRIORITY, "an integer")
_nonneg_int = _int_in(0, MAX_COUNT, "a non-negative integer")
_pos_int = _int_in(1, MAX_COUNT, "a positive integer")
_retries = _int_in(0, MAX_RETRIES, "a non-negative integer")
_cpus = _int_in(1, MAX_CPUS, "a positive integer")

_MEM_UNITS = {"": 1, "MB": 1, "M": 1, "MIB": 1, "GB": 1024, "G": 1024, "GIB": 1024, "KB": 1 / 1024,
              "TB": 1024**2, "T": 1024**2, "TIB": 1024**2}


def memory_mb(v: Any) -> int:
    """Memory in MB (0 allowed): an integer (MB) or a string with a unit such as '4GB' or '512MB'."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d{1,20}(?:\.\d{1,20})?)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).upper() not in _MEM_UNITS:
            raise ValueError(f"expected memory in MB or with a unit (e.g. 4GB), got {_show(v)}")
        mb = float(m.group(1)) * _MEM_UNITS[m.group(2).upper()]
        if mb > MAX_MEMORY_MB:
            raise ValueError(f"expected memory <= {MAX_MEMORY_MB} MB (64 TiB), got {_show(v)}")
        return int(mb)
    i = _int_in(0, MAX_MEMORY_MB, "memory in MB (a non-negative integer)")(v)
    return i


def positive_memory_mb(v: Any) -> int:
    """A memory request: like memory_mb, but more than 0 MB."""
    mb = memory_mb(v)
    if mb <= 0:
        raise ValueError(f"expected more than 0 MB, got {_show(v)}")
    return mb


def walltime_seconds(v: Any) -> int:
    """Walltime in seconds: an integer or 'HH:MM:SS' / 'MM:SS'."""
    if isinstance(v, str) and ":" in v:
        parts = v.strip().split(":")
        if len(parts) > 3 or not all(p.isdigit() and p.isascii() and len(p) <= 10 for p in parts):
            raise ValueError(f"expected seconds or HH:MM:SS, got {_show(v)}")
        total = 0
        for p in parts:
            total = total * 60 + int(p)
        if total > MAX_WALLTIME_S:
            raise ValueError(f"expected a walltime of at most {MAX_WALLTIME_S} s (366 days), got {_show(v)}")
        return total
    try:
        return _int_in(0, MAX_WALLTIME_S, "a non-negative number of seconds")(v)
    except ValueError as exc:
        if isinstance(v, str) and not v.strip().lstrip("-").isdigit():
            raise ValueError(f"expected seconds or HH:MM:SS (e.g. 3600 or 01:00:00), got {_show(v)}") from None
        raise exc from None


def _float_in(lo: float, hi: float, what: str) -> Converter:
    def conv(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        if isinstance(v, str) and len(v) > 40:
            raise ValueError(f"expected a number, got {_show(v)}")
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected a number, got {_show(v)}") from None
        if not math.isfinite(f):
            raise ValueError(f"expected a finite number, got {_show(v)}")
        if f < lo:
            raise ValueError(f"expected {what}, got {_show(v)}")
        if f > hi:
            raise ValueError(f"expected {what} <= {hi:g}, got {_show(v)}")
        return f

    return conv


_float_ge1 = _float_in(1.0, MAX_MULTIPLIER, "a number >= 1")
_delay = _float_in(0.0, MAX_DELAY_S, "a non-negative number")
_poll = _float_in(0.0, MAX_POLL_S, "a non-negative number")


def int_in(lo: int, hi: int, what: str = "an integer") -> Converter:
    """An integer converter bounded to [lo, hi] (for plugin settings)."""
    return _int_in(lo, hi, what)


def float_in(lo: float, hi: float, what: str = "a number") -> Converter:
    """A finite-number converter bounded to [lo, hi] (for plugin settings)."""
    return _float_in(lo, hi, what)


def _str(v: Any) -> str:
    if isinstance(v, (dict, list, set, bytes)):
        raise ValueError(f"expected a string, got a {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"expected a string, got {v!r}")
    return str(v)


string = _str
poll_seconds = _poll


def _str_list(v: Any) -> list[str]:
    """A list of names, given as a YAML list or a comma-separated string."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, list) and all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in v):
        return [str(s) for s in v]
    raise ValueError(f"expected a list of names or a comma-separated string, got {_show(v)}")


def _when_run(v: Any) -> str:
    s = _str(v).upper()
    if s not in ("ALWAYS", "SUCCESS"):
        raise ValueError(f"expected ALWAYS or SUCCESS, got {_show(v)}")
    return s


def _when_run_rubin(v: Any) -> str:
    s = _str(v).upper()
    if s not in ("ALWAYS", "SUCCESS", "NEVER"):
        raise ValueError(f"expected ALWAYS, SUCCESS or NEVER, got {_show(v)}")
    return s


def _bool(v: Any) -> bool:
    """A YAML boolean, or one of the words ctrl_bps accepts for it."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"expected true or false, got {_show(v)}")


def _int_list(v: Any) -> list[int]:
    """Exit codes: one integer, a YAML list of them or a comma-separated string."""
    items = v if isinstance(v, list) else [s for s in str(v).split(",") if s.strip()] if isinstance(v, str) else [v]
    return [_int_in(0, 255, "an exit code (0-255)")(i) for i in items]


def _only(*allowed: str) -> Converter:
    """A ctrl_bps key batchprod supports with some values only: any other says so."""

    def conv(v: Any) -> str:
        s = _str(v)
        if s.upper() not in {a.upper() for a in allowed}:
            raise ValueError(f"batchprod supports only {' or '.join(allowed)} here, got {_show(v)}")
        return s

    return conv


def _true_only(what: str) -> Converter:
    def conv(v: Any) -> bool:
        if not _bool(v):
            raise ValueError(f"batchprod supports only true here ({what})")
        return True

    return conv


def wms_class(v: Any) -> str:
    """A WMS: an entry-point name or 'module:Class' (whether it loads is checked by get_wms)."""
    s = _str(v)
    if not WMS_CLASS_RE.fullmatch(s):
        raise ValueError(f"expected a WMS name (e.g. local, slurm, parsl) or 'module:Class', got {_show(v)}")
    return s


def python_ref(v: Any) -> str:
    """A Python payload 'module:function' (whether it imports is checked by check_python_ref)."""
    s = v if isinstance(v, str) else None
    if s is None or not PYTHON_REF_RE.fullmatch(s):
        raise ValueError(f"expected 'module:function', got {_show(v)}")
    return s


#: Keys that describe one job's resources and retry policy; valid at top level, in site.<name>,
#: cluster.<name> and pipetask.<label>, searched in that (reverse) order.
JOB_KEYS: dict[str, Converter] = {
    "requestCpus": _cpus,
    "requestMemory": positive_memory_mb,
    "requestWalltime": walltime_seconds,
    "priority": _int_any,
    "numberOfRetries": _retries,
    "memoryMultiplier": _float_ge1,
    "memoryLimit": memory_mb,  # 0 = the site's memory
    "maxPreemptions": _retries,
    "infraRetryDelay": _delay,
    "maxInfraRetries": _retries,
}

PAYLOAD_KEYS: dict[str, Converter] = {
    "payloadName": _str,
    "repo": _str,
    "dataQuery": _str,
    "outputRun": _str,
    # input runs searched in this order (a chain: the first run holding a dataset wins); default: all
    "inCollection": _str_list,
}

CLUSTER_KEYS: dict[str, Converter] = {"pipetasks": _str_list, "dimensions": _str_list, **JOB_KEYS}

#: What every site section may hold whatever its WMS: the WMS itself and job values (searched
#: after ``cluster.<name>``). Everything else in a site section is its WMS plugin's setting: each
#: plugin declares its own (a pydantic model, ``settings_model`` on its service class, see
#: ``batchprod.wms.settings``), and prepare checks a site against its own plugin's model.
SITE_BASE_KEYS: dict[str, Converter] = {"wmsServiceClass": wms_class, **JOB_KEYS}


class _SiteKeys(Mapping[str, Converter]):
    """The keys a site section may hold, for the loader: the base keys plus every key an installed
    WMS plugin declares (found through the ``batchprod.wms`` entry points when first asked, so this
    layer imports no plugin). The loader thus refuses a key no plugin knows (with a "did you mean")
    and type-checks a plugin key as its plugin would; prepare then checks each site against its own
    WMS (``partition`` is a Slurm key, not a local one).

    A plugin that fails to import declares no keys; it is remembered in :meth:`broken` (name -> why)
    so that the loader names it and its exception instead of calling its keys unknown, and the table
    is built again at the next config load (:meth:`retry_broken`): one failed import, a plugin being
    reinstalled or a source file caught mid-edit, is not kept for the life of the process."""

    def __init__(self) -> None:
        self._table: dict[str, Converter] | None = None
        self._broken: dict[str, tuple[str, str]] = {}

    def _keys(self) -> dict[str, Converter]:
        if self._table is None:
            table: dict[str, Converter] = dict(SITE_BASE_KEYS)
            keys, broken = _plugin_site_keys()
            for key, models in keys.items():
                table.setdefault(key, _any_of(key, models))
            self._broken = broken
            self._table = table
        return self._table

    def broken(self) -> dict[str, tuple[str, str]]:
        """WMS plugins that failed to load: entry-point name -> (its ``module:Class``, the exception)."""
        self._keys()
        return dict(self._broken)

    def retry_broken(self) -> None:
        """If a plugin failed to load, forget the table: the next lookup loads the plugins again."""
        if self._broken:
            self._table = None
            self._broken = {}

    def __getitem__(self, key: str) -> Converter:
        return self._keys()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def __contains__(self, key: object) -> bool:
        return key in self._keys()


def _plugin_site_keys() -> tuple[dict[str, list[Any]], dict[str, tuple[str, str]]]:
    """(key -> the settings models of installed WMS plugins that declare it, plugins that failed to
    load: name -> (``module:Class``, ``ExceptionType: message``)). A broken plugin is reported, never
    skipped silently: its keys would otherwise look unknown."""
    from importlib.metadata import entry_points

    out: dict[str, list[Any]] = {}
    broken: dict[str, tuple[str, str]] = {}
    for ep in entry_points(group="batchprod.wms"):
        try:
            model = getattr(ep.load(), "settings_model", None)
        except Exception as exc:  # noqa: BLE001 (a broken plugin install: the loader names it and why)
            why = " ".join(str(exc).split())
            broken[ep.name] = (ep.value, f"{type(exc).__name__}: {why[:300]}" if why else type(exc).__name__)
            continue
        keys = getattr(model, "config_keys", None)
        if not callable(keys):
            continue
        for key in keys():
            out.setdefault(key, []).append(model)
    return out, broken


def _any_of(key: str, models: list[Any]) -> Converter:
    """A key several plugins declare: the first plugin that accepts the value converts it (prepare
    checks it again against the site's own plugin)."""

    def conv(v: Any) -> Any:
        first: ValueError | None = None
        for model in models:
            try:
                return model.convert_key(key, v)
            except ValueError as exc:
                first = first or exc
        assert first is not None
        raise first

    return conv


SITE_KEYS = _SiteKeys()

FINAL_JOB_KEYS: dict[str, Converter] = {
    "command": _str,
    "python": python_ref,
    "outputs": _str_list,  # files it writes under <repo>/<outputRun>/: recorded, checksummed, ingested
    "whenRun": _when_run,
    **JOB_KEYS,
}

TOP_KEYS: dict[str, Converter] = {
    "includeConfigs": _str_list,
    "pipelineYaml": _str,
    "computeSite": _str,
    "wmsServiceClass": wms_class,
    "submitPath": _str,
    "operator": _str,
    "project": _str,
    "campaign": _str,
    "timestamp": _str,
    "pollInterval": _poll,
    **JOB_KEYS,
}

#: Sections: key -> (kind, key table). "map" sections hold one sub-table per name.
SECTIONS: dict[str, tuple[str, Mapping[str, Converter]]] = {
    "payload": ("flat", PAYLOAD_KEYS),
    "variables": ("free", {}),  # user-defined {names} for substitution
    "finalJob": ("flat", FINAL_JOB_KEYS),
    "pipetask": ("map", JOB_KEYS),
    "cluster": ("map", CLUSTER_KEYS),
    "site": ("map", SITE_KEYS),
}

#: Variables that only exist when a job runs; ``{name}`` of these is left for the executor.
RUNTIME_VARS = frozenset(
    {"jobName", "label", "dataId", "inputs", "outputs", "attempt", "submitDir", "runName"}
)


# -- ctrl_bps ("Rubin") files ---------------------------------------------------------------------
# A submit file that names a Butler (``payload.butlerConfig``) is read with ctrl_bps's meaning: its
# search order, its defaults (``rubin_defaults.yaml``) and these keys besides ours. README maps
# every ctrl_bps key to batchprod's.

#: ctrl_bps's final-job commands: ``finalJob.command1`` .. ``commandN``, run in order
FINAL_COMMAND_RE = re.compile(r"command\d+")

#: command keys: ``${ENV}`` and ``$ENV`` in them stay for the job's shell (never baked in at load)
RUBIN_COMMAND_KEYS: dict[str, Converter] = {
    k: _str for k in (
        "runQuantumCommand", "createQuantumGraph", "updateQuantumGraph",
        "defaultPreCmdOpts", "qgraphPreCmdOpts", "initPreCmdOpts", "runPreCmdOpts", "updateQgraphPreCmdOpts",
        "pipetaskOutput", "pipetaskInput", "pipetaskDataQuery", "fileDistributionEndPoint",
        "extraQgraphOptions", "extraRunQuantumOptions", "extraInitOptions", "extraUpdateQgraphOptions",
        "extraAggregateOptions",
    )
}

#: job values a ctrl_bps file may set wherever ctrl_bps searches them (payload, cluster, pipetask, site, top)
#: a job's resources and retry policy in a ctrl_bps file: ours and ctrl_bps's
RUBIN_RESOURCE_KEYS: dict[str, Converter] = {
    **JOB_KEYS,
    "requestDisk": memory_mb,
    "requestMemoryMax": memory_mb,
    "retryUnlessExit": _int_list,
    "preemptible": _bool,
}

RUBIN_JOB_KEYS: dict[str, Converter] = {
    **RUBIN_RESOURCE_KEYS,
    "runQuantumCommand": _str,
    "extraRunQuantumOptions": _str,
    "runPreCmdOpts": _str,
}

RUBIN_PAYLOAD_KEYS: dict[str, Converter] = {
    **PAYLOAD_KEYS,
    **RUBIN_JOB_KEYS,
    "butlerConfig": _str,
    "output": _str,
    "runInit": _true_only("the pipetaskInit job always runs first"),
}

#: ctrl_bps keys with no effect here that a ctrl_bps file commonly carries: accepted and ignored
#: (each is a file-naming or debugging switch of ctrl_bps's own submit directory)
RUBIN_IGNORED_KEYS: dict[str, Converter] = {
    k: lambda v: v for k in (
        "qgraphFileTemplate", "subDirTemplate", "templateDataId", "saveDot", "saveGenericWorkflow",
        "saveClusteredQgraph", "validateClusteredQgraph", "useLazyCommands", "makeIdLink", "idLinkPath",
        "uniqProcName",
    )
}

RUBIN_TOP_KEYS: dict[str, Converter] = {
    **TOP_KEYS,
    **RUBIN_COMMAND_KEYS,
    **RUBIN_JOB_KEYS,
    **RUBIN_IGNORED_KEYS,
    **{k: v for k, v in RUBIN_PAYLOAD_KEYS.items() if k not in JOB_KEYS},
    "qgraphFile": _str,
    "clusterAlgorithm": _only("lsst.ctrl.bps.quantum_clustering_funcs.single_quantum_clustering",
                              "lsst.ctrl.bps.quantum_clustering_funcs.dimension_clustering"),
    "whenSaveJobQgraph": _only("NEVER"),
    "bpsUseShared": _true_only("jobs read the graph and the Butler on a shared filesystem"),
}

RUBIN_FINAL_JOB_KEYS: dict[str, Converter] = {
    **{k: v for k, v in FINAL_JOB_KEYS.items() if k not in ("python", "outputs")},
    **RUBIN_JOB_KEYS,
    "whenRun": _when_run_rubin,
    "retryUnlessExit": _int_list,
    "updateOutputChain": _str,
    "finalPreCmdOpts": _str,
    "extraAggregateOptions": _str,
    "whenSetup": _only("NEVER"),
    "implementation": _only("JOB"),
    "concurrencyLimit": _str,
}

RUBIN_CLUSTER_KEYS: dict[str, Converter] = {
    "pipetasks": _str_list, "dimensions": _str_list, "equalDimensions": _str_list,
    "partitionDimensions": _str_list, "partitionMaxClusters": _pos_int, "partitionMaxSize": _pos_int,
    # ctrl_bps walks the graph from sources or sinks with it; the clusters are the same (data IDs decide)
    "findDependencyMethod": _only("source", "sink"),
    **RUBIN_JOB_KEYS,
}

RUBIN_SECTIONS: dict[str, tuple[str, Mapping[str, Converter]]] = {
    "payload": ("flat", RUBIN_PAYLOAD_KEYS),
    "variables": ("free", {}),
    "environment": ("free", {}),  # NAME: value, exported in every job (also in pipetask/cluster/site/finalJob)
    "finalJob": ("flat", RUBIN_FINAL_JOB_KEYS),
    "pipetask": ("map", RUBIN_JOB_KEYS),
    "cluster": ("map", RUBIN_CLUSTER_KEYS),
    "site": ("map", SITE_KEYS),
    "executionButler": ("flat", {"whenCreate": _only("NEVER")}),
}

#: ctrl_bps keys batchprod does not support: the message says what to do instead (never a silent ignore)
RUBIN_UNSUPPORTED: dict[str, str] = {
    "computeCloud": "clouds are PanDA's; give sites in a site catalog (batchprod sites) instead",
    "profile": "HTCondor profile values do not apply; give the site's scheduler options "
               "(e.g. site.<name>.sbatchOptions for Slurm)",
    "queue": "a queue is a Slurm site's partition (taken as site.<name>.partition when the compute site "
             "is a Slurm site and gives no partition of its own); this site has no queue",
    "class": "a ctrl_bps_parsl site class other than lsst.ctrl.bps.parsl.sites.Local (which batchprod "
             "takes); give the site's WMS and settings instead (wmsServiceClass: parsl, parslProvider: slurm, "
             "partition, maxWorkers, ...: README, Site settings)",
    "ordering": "not supported: jobs run in the graph's order",
}

#: Variables filled per job: ``{qgraphNodeId}`` (the job's quanta) and ``{qgraphFile}`` (the run's copy)
RUBIN_RUNTIME_VARS = frozenset({"qgraphNodeId", "qgraphId", "qgraphFile", "inputQgraphFile"})
