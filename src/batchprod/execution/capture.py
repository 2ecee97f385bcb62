"""What a job ran with: software versions, host and environment, as one deduplicated *context*.

A context is recorded once per distinct (host, software, environment) and attempts point to it by
hash, so a 200,000-job run stores a handful of contexts, not 200,000 copies of an environment.
Variables that change per job (attempt, scheduler job ids) are left out so the hash is shared.

Secrets are never stored: only the values of an allow-list of variables that describe the software
environment (paths, locale, threads, Python, conda, EUPS/LSST, batchprod's own settings) are kept,
and even in those, credentials in URLs, ``key=value`` secrets and token shapes (GitHub, GitLab,
Slack, AWS, JWTs, long hex or base64 runs) are replaced by a marker. Every other variable is
recorded by name only: ``DATABASE_URL``, ``GITHUB_PAT``, ``MY_SERVICE_TOKEN`` ... whatever they are
called, their values never reach the run database, the API or an export.
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
#: names whose values are recorded (after scrubbing): they describe the software environment
ALLOWED = re.compile(
    r"^(PATH|HOME|USER|LOGNAME|SHELL|LANG|LANGUAGE|TZ|HOSTNAME|MANPATH|LD_LIBRARY_PATH|LD_PRELOAD|"
    r"DYLD_LIBRARY_PATH|DYLD_FALLBACK_LIBRARY_PATH|VIRTUAL_ENV|CUDA_VISIBLE_DEVICES|VECLIB_MAXIMUM_THREADS|"
    r"HDF5_USE_FILE_LOCKING|MPLBACKEND|LC_\w+|PYTHON\w*|CONDA_\w+|OMP_\w+|MKL_\w+|OPENBLAS_\w+|NUMEXPR_\w+|"
    r"EUPS_\w+|SETUP_\w+|LSST_\w+|DAF_BUTLER_\w+|BATCHPROD_\w+)$"
)
#: an allowed name that still looks secret (``LSST_DB_PASSWORD``, ``BATCHPROD_API_TOKEN``): name only
SECRET = re.compile(r"TOKEN|SECRET|PASSW|PASSPHRASE|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|COOKIE|SESSION|"
                    r"(^|_)(PAT|PWD|PASS|KEY|PIN|CERT)(_|$)", re.I)
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


_SCRUB = (
    # key=value and key: value secrets (query strings, option lists): keep the key
    (re.compile(r"(?i)((?<![a-z])(?:pass(?:word|wd|phrase)?|pwd|token|secret|api[_-]?key|access[_-]?key|"
                r"auth(?:orization|_?token)?|credentials?|session|cookie|signature|sig)[\"']?\s*(?:=|:\s)\s*[\"']?)"
                r"[^\s,;&\"']+"), r"\1" + REDACTED),
    # credentials in URLs: scheme://user:password@host -> scheme://<redacted>@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s,;]*@"), r"\1" + REDACTED + "@"),
    # token shapes: GitHub, GitLab, Slack, AWS key ids, OpenAI/Stripe-like, Google API keys, JWTs, PEM keys
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}|glpat-[A-Za-z0-9_\-]{16,}|"
                r"xox[abposr]-[A-Za-z0-9\-]{8,}|(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{12,}|"
                r"sk_?(?:live|test)?[_-][A-Za-z0-9_\-]{16,}|AIza[0-9A-Za-z_\-]{30,}|"
                r"eyJ[A-Za-z0-9_\-]{8,}(?:\.[A-Za-z0-9_\-]*){0,2})"), REDACTED),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)", re.S), REDACTED),
    # long hex runs (keys, HMACs; a 40-digit git sha too: better lost than a key kept)
    (re.compile(r"(?<![A-Za-z0-9])(?=[0-9a-fA-F]*[0-9])[0-9a-fA-F]{32,}(?![A-Za-z0-9])"), REDACTED),
)
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_\-]{32,}={0,2}")


def _random_looking(m: re.Match[str]) -> str:
    """A long run mixing upper case, lower case and digits the way base64 does (paths and words are
    mostly lower case): a key, not a name."""
    run = m.group(0)
    upper_or_digit = sum(c.isupper() or c.isdigit() for c in run)
    mixed = any(c.islower() for c in run) and any(c.isdigit() for c in run) and any(c.isupper() for c in run)
    return REDACTED if mixed and upper_or_digit >= 0.3 * len(run) else run


def scrub(value: str) -> str:
    """A value with credentials in URLs, ``key=value`` secrets and token-shaped strings replaced by a
    marker (idempotent: scrubbing a scrubbed value changes nothing)."""
    for rx, repl in _SCRUB:
        value = rx.sub(repl, value)
    return _LONG_RUN.sub(_random_looking, value)


def _recorded(name: str) -> bool:
    return bool(ALLOWED.match(name)) and not SECRET.search(name)


def environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of the environment, without per-job variables, values scrubbed."""
    env = os.environ if env is None else env
    return {k: scrub(str(v)) for k, v in sorted(env.items()) if _recorded(k) and not VOLATILE.match(k)}


def environment_names(env: Mapping[str, str] | None = None) -> list[str]:
    """Names (never values) of the variables :func:`environment` leaves out, per-job ones excepted."""
    env = os.environ if env is None else env
    return sorted(k for k in env if not _recorded(k) and not VOLATILE.match(k))


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
        "env_names": environment_names(env),
    }


def sanitize_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A context record as :func:`context_record` would have made it: used on everything the state
    store writes or reads, so a record from an older batchprod (which kept every value whose name did
    not look secret) or from a remote wrapper never brings a secret into the database, the API or an
    export. Idempotent, so a fresh record (and its hash) is unchanged."""
    raw_env = record.get("env")
    env = {str(k): str(v) for k, v in raw_env.items()} if isinstance(raw_env, Mapping) else {}
    names = record.get("env_names")
    kept = set(names) if isinstance(names, list) else set()
    out: dict[str, Any] = {k: (scrub(v) if isinstance(v, str) else v) for k, v in record.items()}
    out["env"] = environment(env)
    out["env_names"] = sorted({str(n) for n in kept} | set(environment_names(env)))
    return out


def context_hash(record: Mapping[str, Any]) -> str:
    """Stable id of a context (canonical JSON, sha256, 16 hex digits)."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def payload_modules(quanta: Iterable[Mapping[str, Any]]) -> list[str]:
    """Module names of the Python payloads in job-spec quanta."""
    return sorted({q["python"].partition(":")[0] for q in quanta if q.get("python")})
