"""Submit YAML loading: includes, variable substitution, search order and validation.

The config is resolved once per lookup context (label, cluster, site) and cached, never searched per
job: ctrl_bps spends most of its transform time in repeated untyped lookups.
"""

from __future__ import annotations

import difflib
import getpass
import os
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from batchprod.config.imports import check_python_ref, check_wms_class
from batchprod.config.keys import (
    FINAL_COMMAND_RE,
    JOB_KEYS,
    RUBIN_COMMAND_KEYS,
    RUBIN_RESOURCE_KEYS,
    RUBIN_RUNTIME_VARS,
    RUBIN_SECTIONS,
    RUBIN_TOP_KEYS,
    RUBIN_UNSUPPORTED,
    RUNTIME_VARS,
    SECTIONS,
    SHELL_KEYS,
    SITE_KEYS,
    TOP_KEYS,
    Converter,
    check_name,
)
from batchprod.config.safe_yaml import check_plain, exists, is_file, one_line, parse_yaml, read_yaml, show
from batchprod.errors import ConfigError

#: ``${ENV}`` (group 1) or ``{variable}`` (group 2), in one pass: a substituted value is never rescanned.
_SUBST = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.]*)\}()")
#: ctrl_bps files: also ``{name:spec}`` format specs (group 3, ``{patch:03}``) and ``$ENV`` (group 4), as
#: ctrl_bps's own substitution and expandvars do (native files keep their meaning: ``{x: 1}`` stays text)
_SUBST_RUBIN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.]*)(?::([^{}:!]{0,20}))?\}"
                          r"|\$([A-Za-z_][A-Za-z0-9_]*)")
#: a variable used somewhere: ``{name}`` or ``{name:spec}`` (user top-level variables of ctrl_bps files)
_VAR_USE = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*)(?::[^{}]*)?\}")
_MISSING = object()
#: Variables may refer to variables this deep (a -> b -> ...); deeper is an error, not a stack overflow.
MAX_VAR_DEPTH = 32
#: A value after substitution ("{a}{a}" with a = "{b}{b}" ... doubles per level).
MAX_VALUE_CHARS = 100_000
_ENV_REF_IN_VALUE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")
#: Where a value set by an override comes from, for error messages.
COMMAND_LINE = "<command line>"
_OVERRIDE_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
#: Environment variables a default needs that a batch or CI environment may not set (``USER``: the
#: config's one resolved login, :attr:`BpsConfig.user`).
_ENV_FALLBACKS = {"PWD": os.getcwd}


def login_name() -> str | None:
    """Who runs batchprod, as ctrl_bps tells its operator: ``$USER``, else the login name (getpass:
    ``$LOGNAME``, ..., then the password database); None if nothing tells."""
    user = os.environ.get("USER")
    if user:
        return user
    try:
        return getpass.getuser() or None
    except Exception:  # noqa: BLE001 (OSError on 3.13+, KeyError before it: no password entry for this uid)
        return None


def _read_yaml(path: Path, key_hint: str = "") -> dict[str, Any]:
    data = read_yaml(path, f"from {key_hint}" if key_hint else "")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _merge(
    dst: dict[str, Any],
    src: Mapping[Any, Any],
    sources: dict[str, str],
    origin: str,
    prefix: str = "",
    src_sources: Mapping[str, str] | None = None,
) -> None:
    """Deep-merge src into dst, remembering which file set each key (for error messages and for
    paths relative to that file). ``src_sources`` (keys set by files src itself included) wins
    over ``origin``, so a key set in a nested include keeps naming that file."""
    stack: list[tuple[dict[str, Any], Mapping[Any, Any], str]] = [(dst, src, prefix)]
    while stack:
        d, s, pre = stack.pop()
        for k, v in s.items():
            k = str(k)
            path = f"{pre}{k}"
            if isinstance(v, Mapping):
                if not isinstance(d.get(k), dict):
                    d[k] = {}
                stack.append((d[k], v, path + "."))
            else:
                d[k] = v
            sources[path] = (src_sources or {}).get(path, origin)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, ValueError, RuntimeError):  # NUL in the name, a symlink loop
        raise ConfigError(f"{one_line(path)}: not a usable file name") from None


def _load_tree(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """One file with its includes merged under it: (data, key path -> file that set it)."""
    path = _resolve(path)
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"{path}: includeConfigs cycle: {chain}")
    if len(stack) > 32:
        raise ConfigError(f"{path}: includeConfigs nested more than 32 files deep")
    raw = _read_yaml(path, key_hint=f"includeConfigs of {stack[-1]}" if stack else "")
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    includes = raw.pop("includeConfigs", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i.strip() for i in includes):
        raise ConfigError(f"{path}: key 'includeConfigs': expected a list of files, got {show(includes)}")
    for inc in includes:
        # relative to the file that names it, so a nested include finds its own neighbours
        expanded = os.path.expandvars(inc.strip())
        unset = re.search(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
        if unset:
            raise ConfigError(f"{path}: key 'includeConfigs': environment variable ${unset.group(1)} is not set "
                              f"(in {one_line(inc, 80)})")
        inc_path = Path(os.path.expanduser(expanded))
        if not inc_path.is_absolute():
            inc_path = path.parent / inc_path
        if not is_file(inc_path):
            raise ConfigError(f"{path}: key 'includeConfigs': file not found: {one_line(inc_path)}")
        inc_data, inc_sources = _load_tree(inc_path, (*stack, path))
        _merge(merged, inc_data, sources, str(_resolve(inc_path)), src_sources=inc_sources)
    _merge(merged, raw, sources, str(path))
    return merged, sources


def _suggest(key: str, allowed: Mapping[str, Any] | frozenset[str]) -> str:
    if len(key) > 100:  # difflib is quadratic; nobody misspells a key by 100 characters
        return ""
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _broken_plugins_note() -> str:
    """For an unknown site key: the WMS plugins that failed to load (their keys are not known)."""
    broken = SITE_KEYS.broken()
    if not broken:
        return ""
    return "; WMS plugins that failed to load, whose keys are not known: " + "; ".join(
        f"'{name}' ({value}): {why}" for name, (value, why) in sorted(broken.items()))


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"{show(value, 40)}"


@lru_cache(maxsize=2)
def _defaults(rubin: bool = False) -> dict[str, Any]:
    """Built-in defaults; for a ctrl_bps file, ctrl_bps's own (``rubin_defaults.yaml``) over ours."""
    text = resources.files("batchprod.config").joinpath("defaults.yaml").read_text()
    base = yaml.safe_load(text)
    if rubin:
        over = yaml.safe_load(resources.files("batchprod.config").joinpath("rubin_defaults.yaml").read_text())
        _merge(base, over, {}, "<defaults>")
    return base


def is_rubin(data: Mapping[str, Any]) -> bool:
    """A ctrl_bps submit file: it names a Butler (``payload.butlerConfig``, or ``butlerConfig``)."""
    payload = data.get("payload")
    return "butlerConfig" in data or (isinstance(payload, Mapping) and "butlerConfig" in payload)


def _formatted(name: str, spec: str, value: str, fail: Any) -> str:
    """``{name:spec}`` as ctrl_bps (Python's format): a number formatted as a number (``{patch:03}``)."""
    v: Any = value
    for conv in (int, float):
        try:
            v = conv(value)
            break
        except ValueError:
            continue
    try:
        return format(v, spec)
    except (ValueError, TypeError) as exc:
        raise fail(f"cannot format {{{name}:{spec}}} with value {show(value, 40)}: {exc}") from None


def _rubin_shell_key(keypath: str) -> bool:
    """A ctrl_bps key run by the job's shell: commands and their option strings, finalJob.commandN."""
    key = keypath.rsplit(".", 1)[-1]
    return key in RUBIN_COMMAND_KEYS or bool(FINAL_COMMAND_RE.fullmatch(key))


@dataclass(frozen=True)
class Context:
    """Where a lookup happens: the job's task label, cluster name and compute site."""

    label: str | None = None
    cluster: str | None = None
    site: str | None = None
    #: a section searched before everything else (ctrl_bps's final job: ``finalJob`` values first)
    section: str | None = None


class BpsConfig:
    """A loaded submit config with ctrl_bps-style search order and substitution.

    Lookup order for a key: ``pipetask.<label>`` > ``cluster.<name>`` > ``site.<computeSite>`` >
    top level > ``payload`` > built-in defaults. A ctrl_bps file (it names a Butler: ``rubin``) is
    searched as ctrl_bps does: ``payload`` > ``cluster.<name>`` > ``pipetask.<label>`` >
    ``site.<computeSite>`` > top level > defaults (ctrl_bps's own), and expands ``$ENV`` too.
    """

    def __init__(self, data: dict[str, Any], sources: dict[str, str], path: Path | None = None) -> None:
        self.data = data
        self.sources = sources
        self.path = path
        self.rubin = is_rubin(data)
        self._subst = _SUBST_RUBIN if self.rubin else _SUBST
        #: what loading changed or assumed that the user should be told (prepare prints them)
        self.notes: list[str] = []
        self._used: frozenset[str] = frozenset()
        self._cache: dict[tuple[str, Context], Any] = {}

    @cached_property
    def user(self) -> str | None:
        """The login this config runs as (:func:`login_name`), resolved once per config: the default
        ``operator`` and every ``${USER}`` of the config are this one value (None: nothing tells)."""
        return login_name()

    # -- lookup -------------------------------------------------------------------------------------
    def _scopes(self, ctx: Context) -> list[tuple[str, Mapping[str, Any]]]:
        d = self.data
        dflt = _defaults(self.rubin)
        out: list[tuple[str, Mapping[str, Any]]] = []
        if ctx.section is not None:
            out.append((f"{ctx.section}.", d.get(ctx.section) or {}))
            out.append((f"<defaults>.{ctx.section}.", dflt.get(ctx.section) or {}))
        if self.rubin:
            out.append(("payload.", d.get("payload") or {}))
        if ctx.cluster is not None and self.rubin:
            out.append((f"cluster.{ctx.cluster}.", (d.get("cluster") or {}).get(ctx.cluster) or {}))
        if ctx.label is not None:
            out.append((f"pipetask.{ctx.label}.", (d.get("pipetask") or {}).get(ctx.label) or {}))
            if self.rubin:  # (ctrl_bps's defaults name pipetask.pipetaskInit: merged under the file's)
                out.append((f"<defaults>.pipetask.{ctx.label}.", (dflt.get("pipetask") or {}).get(ctx.label) or {}))
        if ctx.cluster is not None and not self.rubin:
            out.append((f"cluster.{ctx.cluster}.", (d.get("cluster") or {}).get(ctx.cluster) or {}))
        site = ctx.site if ctx.site is not None else d.get("computeSite", dflt["computeSite"])
        if isinstance(site, str) and site:  # anything else is reported by validate()
            sd = (d.get("site") or {}).get(site)
            if sd is None:
                sd = (dflt.get("site") or {}).get(site) or {}
            out.append((f"site.{site}.", sd))
        out.append(("", d))
        out.append(("variables.", d.get("variables") or {}))
        if not self.rubin:
            out.append(("payload.", d.get("payload") or {}))
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

    def has(self, key: str, ctx: Context = Context()) -> bool:
        """Whether the search order finds the key (defaults included)."""
        return self.find_raw(key, ctx)[0] is not _MISSING

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

    def _substitute(
        self,
        value: Any,
        keypath: str,
        ctx: Context,
        stack: tuple[str, ...],
        memo: dict[str, str] | None = None,
        shell: bool | None = None,
    ) -> Any:
        """Fill ``${ENV}`` and ``{variable}`` in a value (each variable once: ``memo``).

        In a key a shell runs at job time (``finalJob.command``), ``${ENV}`` stays literal, also
        inside the variables it uses, so that no secret is baked into the submit directory.
        """
        if memo is None:
            memo = {}
        if shell is None:
            shell = keypath in SHELL_KEYS or (self.rubin and _rubin_shell_key(keypath))
        if isinstance(value, list):
            return [self._substitute(v, keypath, ctx, stack, memo, shell) for v in value]
        if not isinstance(value, str):
            return value

        def fail(problem: str) -> ConfigError:
            return ConfigError(f"{self.where(keypath)}: key '{keypath}': {problem}")

        def sub(m: re.Match[str]) -> str:
            env, name, spec = m.group(1), m.group(2), m.group(3)
            if env is None and name is None:  # $ENV (ctrl_bps files)
                env = m.group(4)
            if env == "USER" and (self.rubin or not shell):
                # the operator's login, resolved once: in a ctrl_bps file also in a command, so that a
                # job's shell (its environment, set -u) never decides what u/${USER}/... means
                if self.user is None:
                    raise fail("environment variable ${USER} is not set and the login name is unknown")
                return self.user
            if env is not None:
                if shell:
                    return m.group(0)
                if env not in os.environ:
                    if env in _ENV_FALLBACKS:
                        return _ENV_FALLBACKS[env]()
                    raise fail(f"environment variable ${{{env}}} is not set")
                return os.environ[env]
            text = _formatted(name, spec, sub_value(name), fail) if spec else sub_value(name)
            plain = _ENV_REF_IN_VALUE.sub("", text)  # (${NAME}: left for the job's shell, not code)
            if shell and not self.rubin and plain and shlex.quote(plain) != plain and text != "{" + name + "}":
                # a native command takes a variable's value as one plain word only: anything a shell
                # would read as more (a quote, ;, $, a space) could be code, whatever quotes surround
                # the placeholder (ctrl_bps files paste values as ctrl_bps does: option strings)
                raise fail(f"variable {{{name}}} is {one_line(text, 60)!r}, not a plain word (letters, digits, "
                           "and @%+=:,./-): a command takes a variable's value only as one word; pass other "
                           "values through the environment (${NAME} is the job's)")
            return text

        def sub_value(name: str) -> str:
            if name in memo:
                return memo[name]
            if name in stack:
                raise fail(f"variable cycle {' -> '.join((*stack, name))}")
            if len(stack) >= MAX_VAR_DEPTH:
                chain = " -> ".join((*stack[:3], "...", *stack[-2:], name))
                raise fail(f"variables nested more than {MAX_VAR_DEPTH} deep: {chain}")
            raw, sub_path = self.find_raw(name, ctx)
            if raw is _MISSING:
                if name in RUNTIME_VARS or (self.rubin and name in RUBIN_RUNTIME_VARS):
                    return "{" + name + "}"
                raise fail(f"undefined variable {{{name}}}")
            resolved = self._substitute(raw, sub_path, ctx, (*stack, name), memo, shell)
            memo[name] = str(resolved)
            return memo[name]

        out = self._subst.sub(sub, value)
        if len(out) > MAX_VALUE_CHARS:
            raise fail(f"longer than {MAX_VALUE_CHARS} characters once its variables are filled")
        return out

    def render(self, key: str, ctx: Context = Context(), curvals: Mapping[str, str] | None = None) -> str:
        """A key's value with ``curvals`` standing for some variables (ctrl_bps's current values: the
        run's copy of the graph as ``{qgraphFile}``, ...). Not cached."""
        raw, keypath = self.find_raw(key, ctx)
        if raw is _MISSING:
            raise ConfigError(f"{self.where(key)}: required key '{key}' is not set")
        return str(self._substitute(raw, keypath, ctx, (key,), dict(curvals or {})))

    def section_keys(self, section: str) -> list[str]:
        """Keys of a section, the file's and the defaults' (e.g. ctrl_bps's finalJob.command1)."""
        return list(dict.fromkeys([*(self.data.get(section) or {}), *(_defaults(self.rubin).get(section) or {})]))

    def typed(self, key: str, conv: Converter, ctx: Context = Context(), default: Any = _MISSING) -> Any:
        """Look a key up and convert it, turning a bad value into a ConfigError naming file and key."""
        value = self.get(key, ctx, default)
        if value is default and default is not _MISSING:
            return default
        try:
            return conv(value)
        except (ValueError, TypeError, OverflowError) as exc:
            _, keypath = self.find_raw(key, ctx)
            raise ConfigError(f"{self.where(keypath)}: key '{keypath}': {one_line(exc)}") from None

    def job_settings(self, ctx: Context) -> dict[str, Any]:
        """All job-level values (resources, retry policy) for one lookup context, typed."""
        table = RUBIN_RESOURCE_KEYS if self.rubin else JOB_KEYS
        return {k: self.typed(k, conv, ctx, default=None) if k not in JOB_KEYS else self.typed(k, conv, ctx)
                for k, conv in table.items()}

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every key and value once, before anything is written."""
        SITE_KEYS.retry_broken()  # a plugin that failed to load at an earlier load is tried again
        d = self.data
        check_plain(d, self._fail)
        sections, top = (RUBIN_SECTIONS, RUBIN_TOP_KEYS) if self.rubin else (SECTIONS, TOP_KEYS)
        used = self._used = self._used_variables() if self.rubin else frozenset()
        # Sections first: every lookup below walks them.
        for key, (kind, _) in sections.items():
            if key not in d:
                continue
            value = d[key]
            if not isinstance(value, Mapping):
                raise self._fail(key, f"expected a mapping, got {_kind(value)}")
            if kind != "map":
                continue
            for name, sub in value.items():
                path = f"{key}.{name}"
                if key in ("pipetask", "cluster"):
                    try:
                        check_name(name, "task label" if key == "pipetask" else "cluster name")
                    except ValueError as exc:
                        raise self._fail(path, str(exc)) from None
                if not isinstance(sub, Mapping):
                    raise self._fail(path, f"expected a mapping, got {_kind(sub)}")
        for key, value in d.items():  # unknown keys first: a misspelling is the cause of what follows
            if key in sections or key in top:
                continue
            if self.rubin and key in RUBIN_UNSUPPORTED:
                raise self._fail(key, f"ctrl_bps key not supported by batchprod: {RUBIN_UNSUPPORTED[key]}")
            if key in used and not isinstance(value, Mapping):
                continue  # a user variable of a ctrl_bps file: {key} is used somewhere
            known = {**top, **sections, **dict.fromkeys(used)}
            raise ConfigError(
                f"{self.where(key)}: unknown key '{one_line(key, 80)}'{_suggest(key, known)}"
                + (" (a ctrl_bps file may define its own variables, but no value uses "
                   f"{{{one_line(key, 40)}}})" if self.rubin else "")
            )
        for key, value in d.items():
            if key in sections:
                kind, table = sections[key]
                if key == "environment":
                    self._check_environment(value, key)
                elif kind == "free":
                    for name, v in value.items():
                        if isinstance(v, (Mapping, list)):
                            raise self._fail(f"{key}.{name}", "expected a value")
                elif kind == "flat":
                    self._check_table(value, table, key)
                else:
                    for name, sub in value.items():
                        if key == "site":
                            self._check_site_plugin(str(name))
                        self._check_table(sub, table, f"{key}.{name}")
            elif key in top:
                if isinstance(value, Mapping):
                    raise self._fail(key, "expected a value, got a mapping")
                self.typed(key, top[key], Context())
        # Values reached through the search order (defaults included) must type-check in every
        # context that will be used.
        dflt = _defaults(self.rubin)
        site = self.typed("computeSite", TOP_KEYS["computeSite"])
        if site not in (d.get("site") or {}) and site not in (dflt.get("site") or {}):
            raise ConfigError(
                f"{self.where('computeSite')}: key 'computeSite': site '{one_line(site, 80)}' is not defined under 'site'"
                f"{_suggest(site, {**(d.get('site') or {}), **dflt['site']})}"
            )
        defined = sorted(str(n) for n in (d.get("site") or {}) if n != site)
        if defined and site not in (d.get("site") or {}):
            how = "the default" if "computeSite" not in d else "the one chosen"
            self.notes.append(f"site {', '.join(repr(n) for n in defined)} is defined in the file but computeSite is "
                              f"'{one_line(site, 80)}' ({how}): its settings are not used (set computeSite to use it)")
        for label in d.get("pipetask") or {}:
            self.job_settings(Context(label=label))
        for name in d.get("cluster") or {}:
            self.job_settings(Context(cluster=name))
        self.job_settings(Context())
        if self.rubin:
            if "pipelineYaml" not in d and "qgraphFile" not in d:
                raise ConfigError(f"{self.path}: required key 'qgraphFile' (a Rubin quantum graph) or 'pipelineYaml' "
                                  "(with payload.inCollection and payload.dataQuery) is not set")
        elif "pipelineYaml" not in d:
            raise ConfigError(f"{self.path}: required key 'pipelineYaml' is not set"
                              + (" (a Rubin graph, qgraphFile, needs payload.butlerConfig: the Butler the jobs "
                                 "run against)" if "qgraphFile" in d else ""))
        # Python references name something real (imported now, as the job would).
        wms = self.typed("wmsServiceClass", TOP_KEYS["wmsServiceClass"])
        _, keypath = self.find_raw("wmsServiceClass")
        if self.rubin and wms.startswith("lsst.ctrl.bps."):
            raise ConfigError(f"{self.where(keypath)}: key '{keypath}': {wms} is a ctrl_bps plugin; batchprod runs "
                              "the jobs itself: give wmsServiceClass local, slurm or parsl (or htcondor to export a "
                              "DAG), or a site catalog")
        check_wms_class(wms, f"{self.where(keypath)}: key '{keypath}'")
        final = d.get("finalJob") or {}
        if "python" in final:
            ref = self._substitute(final["python"], "finalJob.python", Context(), ("python",))
            check_python_ref(ref, f"{self.where('finalJob.python')}: key 'finalJob.python'")

    def _used_variables(self) -> frozenset[str]:
        """Every ``{name}`` any string value of the file (and ctrl_bps's defaults) uses."""
        names: set[str] = set()
        stack: list[Any] = [self.data, _defaults(True)]
        while stack:
            v = stack.pop()
            if isinstance(v, Mapping):
                stack.extend(v.values())
            elif isinstance(v, list):
                stack.extend(v)
            elif isinstance(v, str) and "{" in v:
                names.update(_VAR_USE.findall(v))
        return frozenset(names)

    def _fail(self, keypath: str, problem: str) -> ConfigError:
        """The error for a bad value: '<file that set it>: key '<keypath>': <problem>'."""
        return ConfigError(f"{self.where(keypath)}: key '{one_line(keypath, 120)}': {problem}")

    def _check_table(self, table: Mapping[str, Any], allowed: Mapping[str, Converter], prefix: str) -> None:
        for k, v in table.items():
            path = f"{prefix}.{k}"
            if self.rubin and k not in allowed and prefix == "finalJob" and FINAL_COMMAND_RE.fullmatch(str(k)):
                allowed = {**allowed, k: str}
            if self.rubin and k == "environment":
                self._check_environment(v, path)
                continue
            if self.rubin and k not in allowed and k in RUBIN_UNSUPPORTED:
                raise self._fail(path, f"ctrl_bps key not supported by batchprod: {RUBIN_UNSUPPORTED[k]}")
            if self.rubin and prefix == "payload" and k not in allowed and k in self._used \
                    and not isinstance(v, (Mapping, list)):
                continue  # a user variable in the payload section (searched first, as in ctrl_bps)
            if k not in allowed:
                raise ConfigError(
                    f"{self.where(path)}: unknown key '{one_line(path, 120)}'{_suggest(str(k), allowed)}"
                    + (_broken_plugins_note() if allowed is SITE_KEYS else "")
                )
            if isinstance(v, Mapping):
                raise self._fail(path, "expected a value, got a mapping")
            value = self._substitute(v, path, self._ctx_for(prefix), (str(k),))
            try:
                allowed[k](value)
            except (ValueError, TypeError, OverflowError) as exc:
                raise self._fail(path, one_line(exc)) from None

    def _check_site_plugin(self, site: str) -> None:
        """A site whose WMS plugin cannot be loaded: one line naming the plugin and its exception (its
        keys would otherwise be reported as unknown)."""
        raw, keypath = self.find_raw("wmsServiceClass", Context(site=site))
        if not isinstance(raw, str):
            return
        for name, (value, why) in SITE_KEYS.broken().items():
            if raw in (name, value, value.replace(":", ".")):
                raise ConfigError(f"{self.where(keypath)}: key '{keypath}' (site '{one_line(site, 80)}'): WMS plugin "
                                  f"'{name}' ({value}) cannot be loaded: {why}")

    def _check_environment(self, env: Any, path: str) -> None:
        """A job environment (ctrl_bps ``environment``): variable names and plain values."""
        if not isinstance(env, Mapping):
            raise self._fail(path, f"expected a mapping of variable names to values, got {_kind(env)}")
        for name, v in env.items():
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", name):
                raise self._fail(f"{path}.{name}", "not a usable environment variable name")
            if isinstance(v, (Mapping, list)) or v is None:
                raise self._fail(f"{path}.{name}", f"expected a value, got {_kind(v)}")

    def environment(self, ctx: Context, curvals: Mapping[str, str] | None = None) -> dict[str, str]:
        """A job's environment (ctrl_bps ``environment``): the first ``environment`` section the search
        order finds for the context, its values filled like a command's (``${ENV}`` left for the job's
        shell)."""
        for prefix, scope in self._scopes(ctx):
            env = scope.get("environment")
            if isinstance(env, Mapping):
                return {str(k): str(self._substitute(str(v), f"{prefix}environment.{k}", ctx, (str(k),),
                                                     dict(curvals or {}), shell=True))
                        for k, v in env.items()}
        return {}

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
            origin = self.sources.get(keypath, "<")
            base = Path(origin).parent if not origin.startswith("<") else Path.cwd()
            p = base / p
        if must_exist and not exists(p):
            raise ConfigError(f"{self.where(keypath)}: key '{keypath}': file not found: {one_line(p)}")
        return p

    def to_dict(self) -> dict[str, Any]:
        """The merged config (as written, before substitution), for freezing into the submit dir."""
        return self.data


def _apply_override(data: dict[str, Any], sources: dict[str, str], dotted: Any, value: Any) -> None:
    """Set one ``-o KEY=VALUE``; a bad KEY is a ConfigError naming '<command line> -o KEY'."""
    shown = dotted if isinstance(dotted, str) and all(
        _OVERRIDE_PART.fullmatch(p) for p in dotted.split(".")) else show(dotted, 80)
    where = f"{COMMAND_LINE} -o {shown}"
    if not isinstance(dotted, str) or not dotted.strip():
        raise ConfigError(f"{where}: empty key (expected -o KEY=VALUE, KEY a dotted path such as site.local.cores)")
    parts = dotted.split(".")
    for part in parts:
        if not _OVERRIDE_PART.fullmatch(part):
            raise ConfigError(f"{where}: key part {show(part, 40)} may only hold letters, digits, '_' or '-'")
    if parts[0] == "includeConfigs":
        raise ConfigError(f"{where}: includeConfigs cannot be set on the command line; include in the file")
    # the value may come from anywhere (a caller, a parsed string): bound it before walking it
    check_plain(value, lambda key, problem: ConfigError(f"{where}: key '{one_line(key, 120)}': {problem}"),
                prefix=dotted)
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            above = ".".join(parts[: i + 1])
            raise ConfigError(f"{where}: '{above}' is a value ({show(nxt, 40)}), not a section with keys")
        cur = nxt
    cur[parts[-1]] = value
    sources[dotted] = where
    if isinstance(value, Mapping):
        _merge({}, value, sources, where, dotted + ".")


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` strings as load_config takes them. VALUE is YAML, read with the same bounds
    as a file (depth, aliases, NUL, ...); a problem is a ConfigError naming '<command line> -o KEY'."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ConfigError(f"{COMMAND_LINE} -o {show(pair, 80)}: expected KEY=VALUE")
        out[key] = parse_yaml(text, f"{COMMAND_LINE} -o {one_line(key, 80)}")
    return out


#: ctrl_bps_parsl's service and its single-machine site class, and what they are here
CTRL_BPS_PARSL = "lsst.ctrl.bps.parsl.ParslService"
CTRL_BPS_PARSL_LOCAL = "lsst.ctrl.bps.parsl.sites.Local"


def _translate_ctrl_bps(data: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """A ctrl_bps file's Parsl choices in batchprod's words: ``ParslService`` is our ``parsl`` WMS and a
    ``lsst.ctrl.bps.parsl.sites.Local`` site (``cores: N``) our Parsl site with local workers (N of
    them). Other ctrl_bps_parsl site classes are refused by name at validation (their settings differ).
    Returns notes saying what was taken as what."""
    notes = []
    if data.get("wmsServiceClass") == CTRL_BPS_PARSL:
        data["wmsServiceClass"] = "parsl"
        notes.append(f"wmsServiceClass {CTRL_BPS_PARSL} is batchprod's parsl WMS")
    for name, site in (data.get("site") or {}).items():
        if not isinstance(site, dict):
            continue
        if site.get("wmsServiceClass") == CTRL_BPS_PARSL:
            site["wmsServiceClass"] = "parsl"
            notes.append(f"site.{name}.wmsServiceClass {CTRL_BPS_PARSL} is batchprod's parsl WMS")
        if site.get("class") == CTRL_BPS_PARSL_LOCAL:
            where = sources.get(f"site.{name}.class", "")
            del site["class"]
            site.setdefault("wmsServiceClass", "parsl")
            site.setdefault("parslProvider", "local")
            sources[f"site.{name}.parslProvider"] = where
            if "cores" in site:
                site["maxWorkers"] = site.pop("cores")
                sources[f"site.{name}.maxWorkers"] = sources.get(f"site.{name}.cores", where)
            notes.append(f"site.{name}: {CTRL_BPS_PARSL_LOCAL} is batchprod's parsl site with local workers "
                         f"(maxWorkers {site.get('maxWorkers', 'this machine')})")
    notes.extend(_queue_as_partition(data, sources))
    return notes


def _queue_as_partition(data: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """ctrl_bps's ``queue`` (top level, or the compute site's) on a Slurm compute site is its
    partition, unless the site gives one; anywhere else it stays, and validation refuses it by name."""
    site_name = data.get("computeSite", "local")
    sites = data.get("site")
    site = sites.get(site_name) if isinstance(sites, dict) else None
    if not isinstance(site_name, str) or not isinstance(site, dict):
        return []
    wms = site.get("wmsServiceClass", data.get("wmsServiceClass", "local"))
    if wms not in ("slurm", "batchprod.wms.slurm:SlurmService", "batchprod.wms.slurm.SlurmService"):
        return []
    key = f"site.{site_name}.queue" if "queue" in site else "queue" if "queue" in data else None
    if key is None or "partition" in site:
        return []
    queue = site.pop("queue") if key != "queue" else data.pop("queue")
    site["partition"] = queue
    sources[f"site.{site_name}.partition"] = sources.get(key, "")
    return [f"{key} {queue!r} is Slurm site '{site_name}''s partition"]


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> BpsConfig:
    """Read a submit YAML with its includes, apply dotted-key overrides, and validate it.

    Every problem is a :class:`ConfigError` of one line naming the file (or ``<command line> -o
    KEY``) and the key; nothing is written.
    """
    p = Path(path)
    data, sources = _load_tree(p)
    for dotted, value in (overrides or {}).items():
        _apply_override(data, sources, dotted, value)
    translated = _translate_ctrl_bps(data, sources) if is_rubin(data) else []
    if "timestamp" not in data:
        # One timestamp per submission, frozen with the config so a restart keeps the same names.
        data["timestamp"] = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        sources["timestamp"] = "<batchprod>"
    cfg = BpsConfig(data, sources, _resolve(p))
    if "operator" not in data:
        # Resolved once here and frozen with the config (as the timestamp): the submit directory, the
        # output run and every command then name the same operator, also on restart.
        if cfg.user is None:
            raise ConfigError(f"{cfg.path}: key 'operator' is not set and neither $USER nor the login name "
                              "says who runs this: set operator")
        data["operator"] = cfg.user
        sources["operator"] = "<batchprod>"
    cfg.notes.extend(translated)
    cfg.validate()
    return cfg
