"""What a job ran with: software versions, host and environment, as one deduplicated *context*.

A context is recorded once per distinct (host, software, environment) and attempts point to it by
hash, so a 200,000-job run stores a handful of contexts, not 200,000 copies of an environment.
Variables that change per job (attempt, scheduler job ids) are left out so the hash is shared, and
values of variables whose names look secret are never stored.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata as md
import json
import os
import platform
import re
import socket
import sys
from collections.abc import Iterable, Mapping
from typing import Any

#: always reported: the interpreter's stack that every payload shares
BASE_PACKAGES = ("batchprod", "numpy", "astropy", "sqlalchemy", "psutil", "parsl", "lsst-pipe-base", "lsst-daf-butler")
SECRET = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|COOKIE|SESSION", re.I)
#: per-job or per-shell noise: would give every attempt its own context
VOLATILE = re.compile(r"^(BATCHPROD_(JOB|ATTEMPT)|OMP_NUM_THREADS|SLURM_.*|SLURMD_.*|PARSL_.*|PWD|OLDPWD|SHLVL|_|"
                      r"TMPDIR|LS_COLORS|TERM.*|SSH_.*|XDG_SESSION.*|PS1)$")
REDACTED = "<redacted>"


def package_versions(modules: Iterable[str] = ()) -> dict[str, str]:
    """Installed version of the base packages and of the distributions providing ``modules``
    (top-level names of payload functions, e.g. ``mypkg`` of ``mypkg.tasks:run``)."""
    out: dict[str, str] = {}
    for name in (*BASE_PACKAGES, *sorted({m.split(".")[0] for m in modules if m})):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            mod = sys.modules.get(name)
            version = getattr(mod, "__version__", None)
            if version is not None:
                out[name] = str(version)
    return out


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without per-job variables, secret values replaced by a marker."""
    env = os.environ if env is None else env
    return {k: (REDACTED if SECRET.search(k) else v) for k, v in sorted(env.items()) if not VOLATILE.match(k)}


def context_record(modules: Iterable[str] = (), env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Host, user, interpreter, platform, package versions and environment of this process."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {
        "host": socket.gethostname(),
        "user": user,
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "packages": package_versions(modules),
        "env": environment(env),
    }


def context_hash(record: Mapping[str, Any]) -> str:
    """Stable id of a context (canonical JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def payload_modules(quanta: Iterable[Mapping[str, Any]]) -> list[str]:
    """Module names of the Python payloads in job-spec quanta."""
    return sorted({q["python"].partition(":")[0] for q in quanta if q.get("python")})
