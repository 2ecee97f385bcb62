"""The site catalog: the compute sites a campaign may use, each with its WMS, capacity and downtimes.

A catalog is one YAML file (``sites.yaml``)::

    sites:
      laptop:  {wmsServiceClass: local, cores: 2, memory: 4GB}
      cluster: {wmsServiceClass: slurm, partition: debug, maxJobs: 500, maxIdle: 50, sharedFilesystem: true,
                opportunistic: false, weight: 1.0,
                downtimes: [{start: "2026-12-01T08:00:00Z", end: "2026-12-01T12:00:00Z", reason: "kernel update"}]}

A site names its WMS plugin (``wmsServiceClass``, default ``local``, found by ``get_wms``); its other
keys are that plugin's own settings (checked by the plugin's ``settings_model``, as ``site.<name>`` of a
submit config is) and the catalog's own keys (:data:`CATALOG_KEYS`). The file is read with the bounded
YAML reader; any problem is one :class:`ConfigError` line naming the file and the key
(``sites.cluster.maxJobs: ...``).

Capacity is derived from the settings directly, not from a backend's ``capacity()``: services build
backends only for a run, and a Parsl backend starts a DataFlowKernel and its interchange, which showing a
catalog must not do. The derivation follows the backends: ``cores`` (or Parsl's ``maxWorkers``),
``memory``, ``maxJobs``, ``maxIdle`` (queued); a local site without ``cores``/``memory`` has this
machine's, as the local backend does; None is "no limit of that kind" (a Slurm site's cores and memory
are its scheduler's business).

A site's state (:class:`SiteState`) comes with its evidence (:class:`SiteStatus`);
:func:`scheduled_state` says what the downtime windows alone make of it at a given time.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchprod.config.keys import SITE_BASE_KEYS, wms_class
from batchprod.config.safe_yaml import check_plain, is_file, one_line, read_yaml, show
from batchprod.engine.dispatcher import BIG, Site
from batchprod.engine.health import SiteState
from batchprod.errors import ConfigError
from batchprod.wms.base import Capacity
from batchprod.wms.registry import get_wms
from batchprod.wms.settings import SiteSettings, service_settings_model, site_capacity

#: A site's name: what ``[A-Za-z0-9_.-]{1,64}`` allows (it appears in paths, metrics and messages).
SITE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The catalog's own keys in a site section (beside ``wmsServiceClass``, job values and plugin settings).
CATALOG_KEYS = ("sharedFilesystem", "opportunistic", "weight", "downtimes")
DOWNTIME_KEYS = ("start", "end", "reason")
#: Windows per site (a catalog is a hand-written file; thousands of windows are a mistake).
MAX_DOWNTIMES = 1000
MAX_SITES = 10_000
DEFAULT_WMS = "local"


@dataclass(frozen=True)
class SiteStatus:
    """A site's state, since when (None: not known) and the evidence for it (one line)."""

    state: SiteState
    since: datetime | None
    evidence: str

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "since": iso(self.since) if self.since else None,
                "evidence": self.evidence}


# -- times ------------------------------------------------------------------------------------------

def iso(t: datetime) -> str:
    """A UTC time as ISO 8601 with a Z (seconds)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(v: Any) -> datetime:
    """An ISO 8601 time with a zone (a string, or the timestamp YAML made of an unquoted one), in UTC;
    ValueError (one line) otherwise."""
    if isinstance(v, datetime):
        t = v
    elif isinstance(v, date):
        raise ValueError(f"expected a time with a zone (2026-12-01T08:00:00Z), got a date {show(v)}")
    elif isinstance(v, str) and len(v) <= 64:
        try:
            t = datetime.fromisoformat(v.strip())
        except ValueError:
            raise ValueError(f"expected an ISO 8601 time with a zone (2026-12-01T08:00:00Z), got {show(v)}") from None
    else:
        raise ValueError(f"expected an ISO 8601 time with a zone (2026-12-01T08:00:00Z), got {show(v)}")
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"time {show(v)} has no zone (add Z or +01:00)")
    try:
        return t.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ValueError(f"time {show(v)} out of range") from None


class Downtime(BaseModel):
    """One scheduled downtime window, [start, end) in UTC."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    start: datetime
    end: datetime
    reason: str = Field("", max_length=300)

    @field_validator("start", "end", mode="before")
    @classmethod
    def _time(cls, v: Any) -> datetime:
        return parse_time(v)

    @field_validator("reason", mode="before")
    @classmethod
    def _reason(cls, v: Any) -> str:
        if v is None:
            return ""
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ValueError(f"expected a string, got {show(v)}")
        return one_line(str(v), 300)

    @model_validator(mode="after")
    def _order(self) -> Downtime:
        if self.end <= self.start:
            raise ValueError(f"end {iso(self.end)} is not after start {iso(self.start)}")
        return self

    def contains(self, t: datetime) -> bool:
        return self.start <= t < self.end

    def describe(self) -> str:
        return f"{iso(self.start)}..{iso(self.end)}" + (f" ({self.reason})" if self.reason else "")

    def to_yaml(self) -> dict[str, str]:
        out = {"start": iso(self.start), "end": iso(self.end)}
        if self.reason:
            out["reason"] = self.reason
        return out


class CatalogKeys(BaseModel):
    """The catalog's own keys of a site section."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    shared_filesystem: bool = Field(True, alias="sharedFilesystem", strict=True)
    opportunistic: bool = Field(False, strict=True)
    weight: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False)
    downtimes: tuple[Downtime, ...] = ()


@dataclass(frozen=True)
class CatalogSite:
    """One site of a catalog: its WMS, the plugin's typed settings and catalog keys."""

    name: str
    wms: str
    settings: SiteSettings
    capacity: Capacity
    shared_filesystem: bool = True
    opportunistic: bool = False
    weight: float = 1.0
    downtimes: tuple[Downtime, ...] = ()

    def apply_to(self, site: Site) -> None:
        """What of the catalog a dispatcher's site follows, also while it runs (a catalog re-read):
        its downtime windows (epoch seconds), whether it is opportunistic, its weight."""
        site.downtimes = [(d.start.timestamp(), d.end.timestamp()) for d in self.downtimes]
        site.opportunistic = self.opportunistic
        site.weight = self.weight

    def next_downtime(self, now: datetime) -> Downtime | None:
        """The window in force at ``now`` or the next one to come."""
        return next((d for d in self.downtimes if d.end > now), None)

    def status_now(self, now: datetime) -> SiteStatus:
        """The state its downtime windows make at ``now`` (see :func:`scheduled_state`)."""
        return scheduled_state(self, now)

    def to_json(self, now: datetime) -> dict[str, Any]:
        nxt = self.next_downtime(now)
        cap = self.capacity
        return {
            "name": self.name, "wms": self.wms,
            "capacity": {"cores": cap.cores, "memory_mb": cap.memory_mb, "max_jobs": cap.max_jobs,
                         "max_queued": cap.max_queued},
            "shared_filesystem": self.shared_filesystem, "opportunistic": self.opportunistic,
            "weight": self.weight,
            "downtimes": [{"start": iso(d.start), "end": iso(d.end), "reason": d.reason} for d in self.downtimes],
            "next_downtime": None if nxt is None else {"start": iso(nxt.start), "end": iso(nxt.end),
                                                       "reason": nxt.reason},
            "status": self.status_now(now).to_json(),
        }


@dataclass(frozen=True)
class SiteCatalog:
    """Every site of a catalog file, in the file's order."""

    path: Path
    sites: Mapping[str, CatalogSite]

    def __getitem__(self, name: str) -> CatalogSite:
        return self.sites[name]


# -- the state the downtime windows make --------------------------------------------------------------

def scheduled_state(site: CatalogSite, now: datetime, walltime: float = 0) -> SiteStatus:
    """What the scheduled downtimes alone make of ``site`` at ``now`` for work of ``walltime`` seconds:
    ``down`` inside a window; ``draining`` when a window starts before ``now + walltime`` (work that
    long started now would still run then: the dispatcher refuses it); else ``online``. Pure: the
    observed state (a scheduler that does not answer) is the dispatcher's to add."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must carry a zone")
    if walltime < 0:
        raise ValueError("walltime must be >= 0")
    now = now.astimezone(UTC)
    horizon = now + timedelta(seconds=walltime)
    last_end: datetime | None = None
    for d in site.downtimes:  # sorted by start, never overlapping
        if d.contains(now):
            return SiteStatus(SiteState.DOWN, d.start, f"scheduled downtime {d.describe()}")
        if d.start > now:
            if d.start < horizon:
                return SiteStatus(SiteState.DRAINING, d.start - timedelta(seconds=walltime),
                                  f"scheduled downtime {d.describe()} starts before work of "
                                  f"{walltime:g} s started now would end")
            break
        last_end = d.end
    return SiteStatus(SiteState.ONLINE, last_end, "no scheduled downtime in force"
                      + (f" (last ended {iso(last_end)})" if last_end else ""))


# -- loading --------------------------------------------------------------------------------------------

def _fail(path: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{path}: {one_line(key, 200)}: {one_line(problem, 400)}")


def _did_you_mean(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6) if len(key) < 100 else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def _pydantic_problem(exc: ValidationError) -> tuple[str, str]:
    """(location below the model, problem) of a validation's first error, in the loader's words."""
    err = exc.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
    inner = (err.get("ctx") or {}).get("error")
    msg = str(inner) if isinstance(inner, Exception) else str(err.get("msg", "invalid value"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown key"
    return loc, one_line(msg.removeprefix("Value error, "), 300)


def _load_site(path: Path, name: str, section: Any) -> CatalogSite:
    prefix = f"sites.{name}"
    if not isinstance(section, dict):
        raise _fail(path, prefix, f"expected a mapping of the site's keys, got {show(section)}")
    raw_wms = section.get("wmsServiceClass", DEFAULT_WMS)
    try:
        wms = wms_class(raw_wms)
        service = get_wms(wms)
    except (ValueError, ConfigError) as exc:
        raise _fail(path, f"{prefix}.wmsServiceClass", str(exc)) from None
    model = service_settings_model(service)
    plugin_keys = model.config_keys()
    values: dict[str, Any] = {}
    catalog: dict[str, Any] = {}
    for key, value in section.items():
        kp = f"{prefix}.{key}"
        if key == "wmsServiceClass":
            continue
        if key in CATALOG_KEYS:
            catalog[key] = value
        elif key in SITE_BASE_KEYS:
            # what a job asks for is its run's (the dispatcher places it as asked, on any site): a
            # catalog value would be silently unused
            raise _fail(path, kp, f"a job value, not a site's: set {key} in the submit config (top level, "
                                  "pipetask.<label> or cluster.<name>)")
        elif key in plugin_keys:
            try:
                values[key] = model.convert_key(key, value)
            except (ValueError, TypeError, OverflowError) as exc:
                raise _fail(path, kp, str(exc)) from None
        else:
            allowed = [*plugin_keys, *CATALOG_KEYS]
            raise _fail(path, kp, f"unknown key for a {model.wms} site{_did_you_mean(key, allowed)}")
    try:
        settings = model.model_validate(values).for_site(name)
    except ValidationError as exc:  # a check across the plugin's keys
        loc, problem = _pydantic_problem(exc)
        raise _fail(path, prefix + loc, problem) from None
    downtimes = catalog.get("downtimes")
    if downtimes is not None:
        if not isinstance(downtimes, list):
            raise _fail(path, f"{prefix}.downtimes", f"expected a list of {{start, end, reason}}, got {show(downtimes)}")
        if len(downtimes) > MAX_DOWNTIMES:
            raise _fail(path, f"{prefix}.downtimes", f"more than {MAX_DOWNTIMES} windows")
        for i, d in enumerate(downtimes):
            if not isinstance(d, dict):
                raise _fail(path, f"{prefix}.downtimes[{i}]", f"expected a mapping {{start, end, reason}}, got {show(d)}")
            for k in d:
                if k not in DOWNTIME_KEYS:
                    raise _fail(path, f"{prefix}.downtimes[{i}].{k}",
                                f"unknown key{_did_you_mean(str(k), DOWNTIME_KEYS)}")
            for k in ("start", "end"):
                if k not in d:
                    raise _fail(path, f"{prefix}.downtimes[{i}].{k}", "missing")
    try:
        keys = CatalogKeys.model_validate(catalog)
    except ValidationError as exc:
        loc, problem = _pydantic_problem(exc)
        raise _fail(path, prefix + loc, problem) from None
    windows = sorted(enumerate(keys.downtimes), key=lambda p: p[1].start)
    for (_, a), (j, b) in zip(windows, windows[1:], strict=False):
        if b.start < a.end:
            raise _fail(path, f"{prefix}.downtimes[{j}]", f"window {b.describe()} overlaps {a.describe()}")
    return CatalogSite(name, wms, settings, site_capacity(settings), keys.shared_filesystem, keys.opportunistic,
                       keys.weight, tuple(d for _, d in windows))


def catalog_from_data(data: Any, path: Path) -> SiteCatalog:
    """A catalog from loaded YAML (``path`` names it in messages)."""
    check_plain(data, lambda key, problem: _fail(path, key or "(top)", problem))
    if not isinstance(data, dict):
        raise _fail(path, "(top)", f"expected a mapping with a 'sites' key, got {show(data)}")
    for key in data:
        if key != "sites":
            raise _fail(path, key, f"unknown key{_did_you_mean(key, ['sites'])}")
    sites = data.get("sites")
    if not isinstance(sites, dict):
        raise _fail(path, "sites", f"expected a mapping of site name -> settings, got {show(sites)}")
    if not sites:
        raise _fail(path, "sites", "the catalog has no site")
    if len(sites) > MAX_SITES:
        raise _fail(path, "sites", f"more than {MAX_SITES} sites")
    out: dict[str, CatalogSite] = {}
    for name, section in sites.items():
        if not SITE_NAME_RE.fullmatch(name):
            raise _fail(path, f"sites.{name}", "a site name is 1 to 64 letters, digits, '_', '.' or '-'")
        out[name] = _load_site(path, name, section)
    return SiteCatalog(path, out)


def load_catalog(path: Path) -> SiteCatalog:
    """Read and check a site catalog file; a problem is one ConfigError line naming file and key."""
    path = Path(path)
    return catalog_from_data(read_yaml(path, "a site catalog"), path)


# -- editing ---------------------------------------------------------------------------------------------

def add_downtime(path: Path, site: str, start: Any, end: Any, reason: str = "") -> Downtime:
    """Append a downtime window to ``site`` in the catalog file and rewrite it atomically (a temporary
    file beside it, then a rename; the rest of its content kept, comments are not). The window is
    checked like one in the file; an overlapping one is refused. Nothing is written on an error."""
    path = Path(path)
    with _locked(path):
        return _add_downtime(path, site, start, end, reason)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on the catalog file (the inode now at ``path``: a writer that renamed a
    new file into place while we waited makes us lock that one), so that two edits at once both land."""
    if not is_file(path):
        read_yaml(path, "a site catalog")  # the usual one-line error
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {one_line(exc.strerror or exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.fstat(fd).st_ino == os.stat(path).st_ino
            except OSError:  # removed meanwhile
                current = False
            if current:
                yield
                return
        finally:
            os.close(fd)  # (releases the lock)
    raise ConfigError(f"{path}: cannot lock: it keeps being replaced")


def _add_downtime(path: Path, site: str, start: Any, end: Any, reason: str) -> Downtime:
    data = read_yaml(path, "a site catalog")
    catalog = catalog_from_data(data, path)
    if site not in catalog.sites:
        raise _fail(path, f"sites.{site}", f"no such site{_did_you_mean(site, list(catalog.sites))}")
    key = f"sites.{site}.downtimes"
    try:
        window = Downtime.model_validate({"start": start, "end": end, "reason": reason})
    except ValidationError as exc:
        loc, problem = _pydantic_problem(exc)
        raise _fail(path, f"{key} (new window){loc}", problem) from None
    for d in catalog[site].downtimes:
        if window.start < d.end and d.start < window.end:
            raise _fail(path, key, f"new window {window.describe()} overlaps {d.describe()}")
    section = data["sites"][site]
    section["downtimes"] = [*(section.get("downtimes") or []), window.to_yaml()]
    catalog_from_data(data, path)  # the whole file again, as it will be written
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False)
    _write_atomic(path, text)
    return window


def _write_atomic(path: Path, text: str) -> None:
    target = path.resolve()
    try:
        mode = target.stat().st_mode & 0o7777
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {one_line(exc.strerror or exc)}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"{path}: cannot write: {one_line(exc.strerror or exc)}") from None


__all__ = ["CATALOG_KEYS", "CatalogSite", "Downtime", "SiteCatalog", "SiteState", "SiteStatus", "add_downtime",
           "catalog_from_data", "load_catalog", "parse_time", "scheduled_state"]


# -- the catalog as the engine's sites ----------------------------------------------------------------

def engine_sites(catalog: SiteCatalog, names: Sequence[str] | None = None) -> list[Site]:
    """The dispatcher's sites for a catalog (all, or ``names`` in that order): each site's backend built
    by its WMS plugin from its typed settings, its capacity, and its scheduled downtimes (the dispatcher
    drains a site before one: no attempt whose walltime would reach it is placed there)."""
    out = []
    for name in names if names is not None else list(catalog.sites):
        cs = catalog[name]
        backend = get_wms(cs.wms).site_backend(cs.settings.for_site(name))
        backend.name = name
        cap = cs.capacity
        site = Site(name, backend, cap.cores or BIG, cap.memory_mb or BIG, cap.max_jobs or BIG,
                    cap.max_queued or BIG)
        cs.apply_to(site)
        out.append(site)
    return out
