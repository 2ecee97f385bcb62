"""What a job ran with: software versions, host and environment, as one deduplicated *context*.

A context is recorded once per distinct (host, software, environment) and attempts point to it by
hash, so a 200,000-job run stores a handful of contexts, not 200,000 copies of an environment.
Variables that change per job (attempt, scheduler job ids) are left out so the hash is shared, and
values of variables whose names look secret are never stored.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
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


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_distributions() -> dict[str, str]:
    """Normalized distribution name -> version, from the ``*.dist-info`` directories on sys.path
    (first wins, as for imports). A directory listing per path entry: the job wrapper calls this at
    every job end, and importing importlib.metadata alone costs ~60 ms."""
    out: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            if n.endswith(".dist-info"):
                name, _, version = n[: -len(".dist-info")].partition("-")
                out.setdefault(_norm(name), version)
    return out


def package_versions(modules: Iterable[str] = ()) -> dict[str, str]:
    """Installed version of the base packages and of the distributions providing ``modules``
    (top-level names of payload functions, e.g. ``mypkg`` of ``mypkg.tasks:run``)."""
    dists = installed_distributions()
    out: dict[str, str] = {}
    for name in (*BASE_PACKAGES, *sorted({m.split(".")[0] for m in modules if m})):
        version = dists.get(_norm(name)) or getattr(sys.modules.get(name), "__version__", None)
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
        "platform": " ".join(os.uname()[0:1] + os.uname()[2:]),  # system, release, version, machine
        "packages": package_versions(modules),
        "env": environment(env),
    }


def context_hash(record: Mapping[str, Any]) -> str:
    """Stable id of a context (canonical JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def payload_modules(quanta: Iterable[Mapping[str, Any]]) -> list[str]:
    """Module names of the Python payloads in job-spec quanta."""
    return sorted({q["python"].partition(":")[0] for q in quanta if q.get("python")})
