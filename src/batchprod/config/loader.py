"""Submit YAML loading: includes, variable substitution, search order and validation.

The config is resolved once per lookup context (label, cluster, site) and cached, never searched per
job: ctrl_bps spends most of its transform time in repeated untyped lookups.
"""

from __future__ import annotations

import difflib
import getpass
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from batchprod.config.keys import (
    JOB_KEYS,
    RUNTIME_VARS,
    SECTIONS,
    TOP_KEYS,
    Converter,
)
from batchprod.errors import ConfigError

_VAR = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_.]*)\}")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_MISSING = object()
#: Environment variables a default needs that a batch or CI environment may not set.
_ENV_FALLBACKS = {"PWD": os.getcwd, "USER": getpass.getuser}


def _read_yaml(path: Path, key_hint: str = "") -> dict[str, Any]:
    where = f" (from {key_hint})" if key_hint else ""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found{where}")
    try:
        with path.open() as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{at} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(dst: dict[str, Any], src: Mapping[str, Any], sources: dict[str, str], origin: str, prefix: str = "") -> None:
    """Deep-merge src into dst, remembering which file set each leaf (for error messages)."""
    for k, v in src.items():
        k = str(k)
        path = f"{prefix}{k}"
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            _merge(dst[k], v, sources, origin, path + ".")
        elif isinstance(v, Mapping):
            dst[k] = {}
            _merge(dst[k], v, sources, origin, path + ".")
        else:
            dst[k] = v
        sources[path] = origin


def _load_tree(path: Path, sources: dict[str, str], stack: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: includeConfigs cycle: {chain}")
    raw = _read_yaml(path, key_hint=f"includeConfigs of {stack[-1]}" if stack else "")
    merged: dict[str, Any] = {}
    includes = raw.pop("includeConfigs", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        raise ConfigError(f"{path}: key 'includeConfigs': expected a list of files")
    for inc in includes:
        inc_path = Path(os.path.expandvars(str(inc)))
        if not inc_path.is_absolute():
            inc_path = path.parent / inc_path
        if not inc_path.is_file():
            raise ConfigError(f"{path}: key 'includeConfigs': file not found: {inc_path}")
        _merge(merged, _load_tree(inc_path, sources, (*stack, path)), sources, str(inc_path))
    _merge(merged, raw, sources, str(path))
    return merged


def _suggest(key: str, allowed: Mapping[str, Any] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


@lru_cache(maxsize=1)
def _defaults() -> dict[str, Any]:
    text = resources.files("batchprod.config").joinpath("defaults.yaml").read_text()
    return yaml.safe_load(text)


@dataclass(frozen=True)
class Context:
    """Where a lookup happens: the job's task label, cluster name and compute site."""

    label: str | None = None
    cluster: str | None = None
    site: str | None = None


class BpsConfig:
    """A loaded submit config with ctrl_bps-style search order and substitution.

    Lookup order for a key: ``pipetask.<label>`` > ``cluster.<name>`` > ``site.<computeSite>`` >
    top level > ``payload`` > built-in defaults.
    """

    def __init__(self, data: dict[str, Any], sources: dict[str, str], path: Path | None = None) -> None:
        self.data = data
        self.sources = sources
        self.path = path
        self._cache: dict[tuple[str, Context], Any] = {}

    # -- lookup -------------------------------------------------------------------------------------
    def _scopes(self, ctx: Context) -> list[tuple[str, Mapping[str, Any]]]:
        d = self.data
        out: list[tuple[str, Mapping[str, Any]]] = []
        if ctx.label is not None:
            out.append((f"pipetask.{ctx.label}.", (d.get("pipetask") or {}).get(ctx.label) or {}))
        if ctx.cluster is not None:
            out.append((f"cluster.{ctx.cluster}.", (d.get("cluster") or {}).get(ctx.cluster) or {}))
        site = ctx.site if ctx.site is not None else d.get("computeSite", _defaults()["computeSite"])
        if site:
            sd = (d.get("site") or {}).get(site)
            if sd is None:
                sd = (_defaults().get("site") or {}).get(site) or {}
            out.append((f"site.{site}.", sd))
        out.append(("", d))
        out.append(("variables.", d.get("variables") or {}))
        out.append(("payload.", d.get("payload") or {}))
        dflt = _defaults()
        out.append(("<defaults>.", dflt))
        out.append(("<defaults>.payload.", dflt.get("payload") or {}))
        return out

    def where(self, keypath: str) -> str:
        """The file that set a key path (for error messages)."""
        if keypath in self.sources:
            return self.sources[keypath]
        return str(self.path) if self.path else "<config>"

    def find_raw(self, key: str, ctx: Context = Context()) -> tuple[Any, str]:
        """Return (raw value, dotted key path where it was found) following the search order."""
        for prefix, scope in self._scopes(ctx):
            if key in scope and not isinstance(scope[key], Mapping):
                return scope[key], prefix + key
        return _MISSING, key

    def get(self, key: str, ctx: Context = Context(), default: Any = _MISSING) -> Any:
        """Look a key up with the search order and substitute its variables."""
        ck = (key, ctx)
        if ck in self._cache:
            return self._cache[ck]
        raw, keypath = self.find_raw(key, ctx)
        if raw is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.where(key)}: required key '{key}' is not set")
            return default
        value = self._substitute(raw, keypath, ctx, (key,))
        self._cache[ck] = value
        return value

    def _substitute(self, value: Any, keypath: str, ctx: Context, stack: tuple[str, ...]) -> Any:
        if isinstance(value, list):
            return [self._substitute(v, keypath, ctx, stack) for v in value]
        if not isinstance(value, str):
            return value

        def env(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                if name in _ENV_FALLBACKS:
                    return _ENV_FALLBACKS[name]()
                raise ConfigError(
                    f"{self.where(keypath)}: key '{keypath}': environment variable ${{{name}}} is not set"
                )
            return os.environ[name]

        value = _ENV.sub(env, value)

        def var(m: re.Match[str]) -> str:
            name = m.group(1)
            if name in stack:
                chain = " -> ".join((*stack, name))
                raise ConfigError(f"{self.where(keypath)}: key '{keypath}': variable cycle {chain}")
            raw, sub_path = self.find_raw(name, ctx)
            if raw is _MISSING:
                if name in RUNTIME_VARS:
                    return m.group(0)
                raise ConfigError(
                    f"{self.where(keypath)}: key '{keypath}': undefined variable {{{name}}}"
                )
            resolved = self._substitute(raw, sub_path, ctx, (*stack, name))
            return str(resolved)

        out = _VAR.sub(var, value)
        return out

    def typed(self, key: str, conv: Converter, ctx: Context = Context(), default: Any = _MISSING) -> Any:
        """Look a key up and convert it, turning a bad value into a ConfigError naming file and key."""
        value = self.get(key, ctx, default)
        if value is default and default is not _MISSING:
            return default
        try:
            return conv(value)
        except ValueError as exc:
            _, keypath = self.find_raw(key, ctx)
            raise ConfigError(f"{self.where(keypath)}: key '{keypath}': {exc}") from None

    def job_settings(self, ctx: Context) -> dict[str, Any]:
        """All job-level values (resources, retry policy) for one lookup context, typed."""
        return {k: self.typed(k, conv, ctx) for k, conv in JOB_KEYS.items()}

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every key and value once, before anything is written."""
        d = self.data
        for key, value in d.items():
            if key in SECTIONS:
                kind, table = SECTIONS[key]
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{self.where(key)}: key '{key}': expected a mapping")
                if kind == "free":
                    for name, v in value.items():
                        if isinstance(v, (Mapping, list)):
                            raise ConfigError(
                                f"{self.where(f'{key}.{name}')}: key '{key}.{name}': expected a value"
                            )
                elif kind == "flat":
                    self._check_table(value, table, key)
                else:
                    for name, sub in value.items():
                        if not isinstance(sub, Mapping):
                            raise ConfigError(
                                f"{self.where(f'{key}.{name}')}: key '{key}.{name}': expected a mapping"
                            )
                        self._check_table(sub, table, f"{key}.{name}")
            elif key not in TOP_KEYS:
                raise ConfigError(
                    f"{self.where(key)}: unknown key '{key}'{_suggest(key, {**TOP_KEYS, **SECTIONS})}"
                )
            else:
                if isinstance(value, Mapping):
                    raise ConfigError(f"{self.where(key)}: key '{key}': expected a value, got a mapping")
                self.typed(key, TOP_KEYS[key], Context())
        # Values reached through the search order (defaults included) must type-check in every
        # context that will be used.
        site = self.get("computeSite")
        if site not in (d.get("site") or {}) and site not in (_defaults().get("site") or {}):
            raise ConfigError(
                f"{self.where('computeSite')}: key 'computeSite': site '{site}' is not defined under 'site'"
                f"{_suggest(site, {**(d.get('site') or {}), **_defaults()['site']})}"
            )
        for label in d.get("pipetask") or {}:
            self.job_settings(Context(label=label))
        for name in d.get("cluster") or {}:
            self.job_settings(Context(cluster=name))
        self.job_settings(Context())
        if "pipelineYaml" not in d:
            raise ConfigError(f"{self.path}: required key 'pipelineYaml' is not set")

    def _check_table(self, table: Mapping[str, Any], allowed: Mapping[str, Converter], prefix: str) -> None:
        for k, v in table.items():
            path = f"{prefix}.{k}"
            if k not in allowed:
                raise ConfigError(f"{self.where(path)}: unknown key '{path}'{_suggest(str(k), allowed)}")
            if isinstance(v, Mapping):
                raise ConfigError(f"{self.where(path)}: key '{path}': expected a value, got a mapping")
            value = self._substitute(v, path, self._ctx_for(prefix), (str(k),))
            try:
                allowed[k](value)
            except ValueError as exc:
                raise ConfigError(f"{self.where(path)}: key '{path}': {exc}") from None

    @staticmethod
    def _ctx_for(prefix: str) -> Context:
        parts = prefix.split(".", 1)
        if parts[0] == "pipetask" and len(parts) == 2:
            return Context(label=parts[1])
        if parts[0] == "cluster" and len(parts) == 2:
            return Context(cluster=parts[1])
        if parts[0] == "site" and len(parts) == 2:
            return Context(site=parts[1])
        return Context()

    # -- files --------------------------------------------------------------------------------------
    def resolve_path(self, key: str, must_exist: bool = True) -> Path:
        """A path-valued key, relative to the file that set it; missing file -> ConfigError."""
        value = self.get(key)
        _, keypath = self.find_raw(key)
        p = Path(os.path.expanduser(str(value)))
        if not p.is_absolute():
            base = Path(self.where(keypath)).parent if keypath in self.sources else Path.cwd()
            p = base / p
        if must_exist and not p.exists():
            raise ConfigError(f"{self.where(keypath)}: key '{keypath}': file not found: {p}")
        return p

    def to_dict(self) -> dict[str, Any]:
        """The merged config (as written, before substitution), for freezing into the submit dir."""
        return self.data


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> BpsConfig:
    """Read a submit YAML with its includes, apply dotted-key overrides, and validate it."""
    p = Path(path)
    sources: dict[str, str] = {}
    data = _load_tree(p, sources)
    for dotted, value in (overrides or {}).items():
        cur = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
        cur[parts[-1]] = value
        sources[dotted] = "<command line>"
    if "timestamp" not in data:
        # One timestamp per submission, frozen with the config so a restart keeps the same names.
        data["timestamp"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sources["timestamp"] = "<batchprod>"
    cfg = BpsConfig(data, sources, p.resolve())
    cfg.validate()
    return cfg
