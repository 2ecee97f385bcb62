"""Site settings: what a WMS plugin reads from ``site.<name>``, typed, bounded and documented.

Each plugin declares its settings as a pydantic model derived from :class:`SiteSettings` (fields in
snake_case, config keys in camelCase: ``max_jobs`` is ``maxJobs``) and names it on its service class
(``settings_model``), as snakemake executor plugins declare theirs: the model is the validation and
the documentation (``describe()``). A site section may also hold what is not any plugin's
(``wmsServiceClass`` and job values such as ``requestMemory``: ``config.keys.SITE_BASE_KEYS``).

Values are looked up through the config's search order for the site (``site.<name>.<key>``, then the
top level, then the built-in defaults; never a ``variables`` or ``payload`` entry that happens to share
the name) and substituted (``{var}``, ``${ENV}``) like every other value, so ``partition: "{part}"``
reaches sbatch as ``debug``. They are checked at prepare (:func:`check_sites`: an unknown key or a bad
value is one ``ConfigError`` line naming the file and the key, before anything is written) and
resolved again when a backend is built for a run (:func:`run_site_settings`, from the run's frozen
config: ``${ENV}`` comes from the engine's environment then).
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, PrivateAttr, ValidationError
from pydantic.alias_generators import to_camel

from batchprod.config import BpsConfig, Context
from batchprod.config.keys import MAX_COUNT, SITE_BASE_KEYS, float_in, int_in, memory_mb, poll_seconds, string
from batchprod.config.safe_yaml import one_line
from batchprod.errors import ConfigError
from batchprod.wms.base import Capacity

if TYPE_CHECKING:
    from batchprod.state.run import Run

S = TypeVar("S", bound="SiteSettings")

#: Field types shared by plugins (bounded like every other config number; errors read like the loader's).
Count = Annotated[int, BeforeValidator(int_in(1, MAX_COUNT, "a positive integer"))]
Cores = Annotated[int, BeforeValidator(int_in(1, 2**20, "a positive integer"))]
MemoryMB = Annotated[int, BeforeValidator(memory_mb)]
Seconds = Annotated[float, BeforeValidator(poll_seconds)]
Text = Annotated[str, BeforeValidator(string)]
Fraction = Annotated[float, BeforeValidator(float_in(0.0, 1.0, "a number between 0 and 1"))]


class SiteSettings(BaseModel):
    """Settings every site has. Plugins derive their own model from this one."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, alias_generator=to_camel,
                              validate_default=False)
    #: the plugin's name, for messages
    wms: ClassVar[str] = "base"
    _site: str = PrivateAttr("")

    @property
    def site(self) -> str:
        """The site's name (its ``site.<name>`` section; the plugin's name when built by hand)."""
        return self._site or self.wms

    def for_site(self: S, name: str) -> S:
        """These settings, named (for messages and ``SiteUnavailable``)."""
        self._site = name
        return self

    @classmethod
    def config_keys(cls) -> dict[str, str]:
        """config key -> field name."""
        return {(f.alias or name): name for name, f in cls.model_fields.items()}

    @classmethod
    def convert_key(cls, key: str, value: Any) -> Any:
        """One key's value, converted as the model would; ValueError (one line) if it is not valid."""
        field = cls.config_keys().get(key)
        if field is None:
            raise ValueError(f"unknown {cls.wms} setting '{key}'")
        try:
            return getattr(cls.model_validate({key: value}), field)
        except ValidationError as exc:
            raise ValueError(_problem(exc)) from None

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(config key, type, default, description) per setting: the plugin's documentation."""
        return [(f.alias or name, _type_name(f.annotation), f.default, f.description or "")
                for name, f in cls.model_fields.items()]


def _type_name(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " or ".join(str(a) for a in args)
    return str(getattr(ann, "__name__", ann))


def _problem(exc: ValidationError) -> str:
    """The first error of a validation, in the loader's words (its converters raise the message)."""
    err = exc.errors()[0]
    inner = (err.get("ctx") or {}).get("error")
    msg = str(inner) if isinstance(inner, Exception) else str(err.get("msg", "invalid value"))
    return one_line(msg, 300)


# -- resolving ----------------------------------------------------------------------------------------

def _site_name(cfg: BpsConfig, site: str | None) -> str:
    return site if site is not None else str(cfg.get("computeSite"))


def site_wms(cfg: BpsConfig, site: str | None = None) -> str:
    """The WMS a site names (its ``wmsServiceClass``, else the top-level one)."""
    return str(cfg.get("wmsServiceClass", Context(site=_site_name(cfg, site))))


def site_capacity(settings: SiteSettings) -> Capacity:
    """What a site can take at once, from its settings alone (no backend is built, nothing is asked of
    a scheduler): cores (or Parsl workers), memory, maxJobs, maxIdle; a local site's default is this
    machine's."""
    cores = getattr(settings, "cores", None) or getattr(settings, "max_workers", None)
    memory = getattr(settings, "memory", None) or None
    if settings.wms == "local":  # (the plugin's own name: 'batchprod.wms.local:LocalService' is local too)
        import os

        import psutil

        cores = cores or os.cpu_count() or 1
        memory = memory or int(psutil.virtual_memory().total / 2**20)
    return Capacity(cores, memory, getattr(settings, "max_jobs", None), getattr(settings, "max_idle", None))


def site_settings(cfg: BpsConfig, model: type[S], site: str | None = None) -> S:
    """The typed settings of ``site`` (default: the compute site) for one plugin's ``model``: keys the
    site section holds that neither the model nor ``SITE_BASE_KEYS`` know are refused, values come
    through the search order, substituted; a problem is one ConfigError naming file and key."""
    name = _site_name(cfg, site)
    ctx = Context(site=name)
    keys = model.config_keys()
    section = (cfg.data.get("site") or {}).get(name) or {}
    prefix = f"site.{name}."
    for k in section:
        if k not in keys and k not in SITE_BASE_KEYS:
            allowed = [*keys, *SITE_BASE_KEYS]
            close = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6) if len(str(k)) < 100 else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{cfg.where(prefix + str(k))}: unknown key '{one_line(prefix + str(k), 120)}' "
                              f"for a {model.wms} site{hint}")
    values: dict[str, Any] = {}
    for key in keys:
        _, keypath = cfg.find_raw(key, ctx)
        # the site's own section, the top level (a key valid there) or the built-in defaults; a
        # variable or payload entry of the same name is not a site setting
        top = keypath == key and key in cfg.data  # (not found at all: keypath is the bare key too)
        if not (keypath.startswith(prefix) or top or keypath == f"<defaults>.{key}"):
            continue
        raw = cfg.get(key, ctx)
        try:
            values[key] = model.convert_key(key, raw)
        except ValueError as exc:
            raise ConfigError(f"{cfg.where(keypath)}: key '{keypath}': {one_line(exc)}") from None
    try:
        settings = model.model_validate(values)
    except ValidationError as exc:  # a check across keys
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err.get("loc") else ""
        where = cfg.where(prefix + key) if key else cfg.where(prefix.rstrip("."))
        raise ConfigError(f"{where}: key '{prefix}{key}': {_problem(exc)}") from None
    return settings.for_site(name)


def service_settings_model(service: Any) -> type[SiteSettings]:
    """The settings model a WMS service declares (``settings_model``); the bare one if none."""
    model = getattr(service, "settings_model", None)
    return model if isinstance(model, type) and issubclass(model, SiteSettings) else SiteSettings


def _service(cfg: BpsConfig, name: str) -> Any:
    from batchprod.wms.registry import get_wms

    try:
        return get_wms(site_wms(cfg, name))
    except ConfigError as exc:
        _, keypath = cfg.find_raw("wmsServiceClass", Context(site=name))
        raise ConfigError(f"{cfg.where(keypath)}: key '{keypath}': {exc}") from None


def settings_for(cfg: BpsConfig, site: str | None = None) -> SiteSettings:
    """The typed settings of a site for the WMS it names (loaded: an unknown WMS is a ConfigError)."""
    name = _site_name(cfg, site)
    return site_settings(cfg, service_settings_model(_service(cfg, name)), name)


def check_sites(cfg: BpsConfig) -> SiteSettings:
    """At prepare: every site section against its own plugin's settings. A site whose WMS does not
    load here is checked only if it is the compute site (that one must load; another may name a
    plugin installed only where it runs). Returns the compute site's settings."""
    compute = _site_name(cfg, None)
    for name in cfg.data.get("site") or {}:
        if name == compute:
            continue
        try:
            service = _service(cfg, name)
        except ConfigError:
            continue
        site_settings(cfg, service_settings_model(service), name)
    return settings_for(cfg, compute)


def run_config(run: Run) -> BpsConfig:
    """A run's frozen config as a BpsConfig (for lookups with substitution)."""
    from batchprod.execution.rundir import CONFIG_FILE

    data = run.config
    return BpsConfig(data, {}, run.submit_dir / CONFIG_FILE)


def run_site_settings(run: Run, model: type[S]) -> S:
    """The compute site's settings of a run, from its frozen config, substituted."""
    return site_settings(run_config(run), model)


def documented(settings: Mapping[str, type[SiteSettings]]) -> list[str]:
    """Markdown table rows documenting plugins' settings (README)."""
    rows = []
    for wms, model in settings.items():
        for key, typ, default, desc in model.describe():
            shown = "unset" if default is None else f"`{default}`" if default != "" else "empty"
            rows.append(f"| `{wms}` | `{key}` | {typ} | {shown} | {desc} |")
    return rows


__all__ = ["SiteSettings", "check_sites", "run_site_settings", "service_settings_model", "settings_for",
           "site_settings", "site_wms"]
