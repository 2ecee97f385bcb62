"""The key table: every key a submit YAML may hold, where, and of which type.

One table drives unknown-key detection (with "did you mean"), type checks and documentation, so the
schema cannot drift from the code that reads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer, got a boolean")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
        return int(v)
    raise ValueError(f"expected an integer, got {v!r}")


def _nonneg_int(v: Any) -> int:
    i = _int(v)
    if i < 0:
        raise ValueError(f"expected a non-negative integer, got {v!r}")
    return i


def _pos_int(v: Any) -> int:
    i = _int(v)
    if i <= 0:
        raise ValueError(f"expected a positive integer, got {v!r}")
    return i


Converter = Callable[[Any], Any]

_MEM_UNITS = {"": 1, "MB": 1, "M": 1, "MIB": 1, "GB": 1024, "G": 1024, "GIB": 1024, "KB": 1 / 1024}


def memory_mb(v: Any) -> int:
    """Memory in MB: an integer (MB) or a string with a unit such as '4GB' or '512MB'."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", v)
        if not m or m.group(2).upper() not in _MEM_UNITS:
            raise ValueError(f"expected memory in MB or with a unit (e.g. 4GB), got {v!r}")
        return int(float(m.group(1)) * _MEM_UNITS[m.group(2).upper()])
    return _nonneg_int(v)


def walltime_seconds(v: Any) -> int:
    """Walltime in seconds: an integer or 'HH:MM:SS' / 'MM:SS'."""
    if isinstance(v, str) and ":" in v:
        parts = v.strip().split(":")
        if len(parts) > 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected seconds or HH:MM:SS, got {v!r}")
        total = 0
        for p in parts:
            total = total * 60 + int(p)
        return total
    return _nonneg_int(v)


def _float_at_least(lo: float, what: str) -> Converter:
    def conv(v: Any) -> float:
        if isinstance(v, bool):
            raise ValueError("expected a number, got a boolean")
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {v!r}") from None
        if f < lo:
            raise ValueError(f"expected {what}, got {v!r}")
        return f

    return conv


_float_ge1 = _float_at_least(1.0, "a number >= 1")
_nonneg_float = _float_at_least(0.0, "a non-negative number")


def _str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise ValueError(f"expected a string, got a {type(v).__name__}")
    return str(v)


def _str_list(v: Any) -> list[str]:
    """A list of names, given as a YAML list or a comma-separated string."""
    if isinstance(v, str):
        return [s.strip() for s in v.split(",") if s.strip()]
    if isinstance(v, list) and all(isinstance(s, (str, int)) for s in v):
        return [str(s) for s in v]
    raise ValueError(f"expected a list of names or a comma-separated string, got {v!r}")


def _when_run(v: Any) -> str:
    s = _str(v).upper()
    if s not in ("ALWAYS", "SUCCESS"):
        raise ValueError(f"expected ALWAYS or SUCCESS, got {v!r}")
    return s


#: Keys that describe one job's resources and retry policy; valid at top level, in site.<name>,
#: cluster.<name> and pipetask.<label>, searched in that (reverse) order.
JOB_KEYS: dict[str, Converter] = {
    "requestCpus": _pos_int,
    "requestMemory": memory_mb,
    "requestWalltime": walltime_seconds,
    "priority": _int,
    "numberOfRetries": _nonneg_int,
    "memoryMultiplier": _float_ge1,
    "memoryLimit": memory_mb,
    "maxPreemptions": _nonneg_int,
    "infraRetryDelay": _nonneg_float,
    "maxInfraRetries": _nonneg_int,
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

SITE_KEYS: dict[str, Converter] = {
    "wmsServiceClass": _str,
    "cores": _pos_int,
    "memory": memory_mb,
    # batch systems
    "partition": _str,
    "account": _str,
    "qos": _str,
    "sbatchOptions": _str,
    "maxJobs": _pos_int,
    "maxIdle": _pos_int,
    "pollInterval": _nonneg_float,
    "parslProvider": _str,
    "maxWorkers": _pos_int,
    **JOB_KEYS,
}

FINAL_JOB_KEYS: dict[str, Converter] = {
    "command": _str,
    "python": _str,
    "outputs": _str_list,  # files it writes under <repo>/<outputRun>/: recorded, checksummed, ingested
    "whenRun": _when_run,
    **JOB_KEYS,
}

TOP_KEYS: dict[str, Converter] = {
    "includeConfigs": _str_list,
    "pipelineYaml": _str,
    "computeSite": _str,
    "wmsServiceClass": _str,
    "submitPath": _str,
    "operator": _str,
    "project": _str,
    "campaign": _str,
    "timestamp": _str,
    "pollInterval": lambda v: float(v),
    **JOB_KEYS,
}

#: Sections: key -> (kind, key table). "map" sections hold one sub-table per name.
SECTIONS: dict[str, tuple[str, dict[str, Converter]]] = {
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
