"""The campaign file: a named, owned, prioritized set of runs (submit configs) in steps.

::

    campaign: drp-2026          # name: letters, digits, '_', '.', '-'
    owner: alice                # default: $USER
    priority: 10                # higher first (default 0)
    share: 1.0                  # fair-share target among campaigns of equal priority (default 1)
    onSiteDown: redispatch      # or hold: what happens to work in flight on a site declared down
    stuckAfter: 6h              # a step running longer than this without progress is an incident
    steps:
      - name: isr
        submit: [isr-a.yaml, isr-b.yaml]   # submit configs, relative to this file
        sites: [cluster]                   # pin: only these sites (default: any)
      - name: coadd
        after: [isr]                       # default: the step before (after: [] for none)
        fraction: 0.5                      # start when half of isr's jobs succeeded (default 1: all)
        exclude: [laptop]
        submit: [coadd.yaml]
      - name: qa
        gate: true                         # waits for 'batchprod campaign gate release CAMPAIGN qa'
        submit: [qa.yaml]

Read with the bounded YAML reader; each submit config is loaded and checked at ``campaign create``
(a config error there is one line naming that file and key, and nothing is written). Runs are
*prepared* only when their step starts: a later step's inputs are the outputs of an earlier one.
"""

from __future__ import annotations

import getpass
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchprod.campaign.sites import _did_you_mean, _fail, _pydantic_problem
from batchprod.config.safe_yaml import check_plain, read_yaml, show
from batchprod.errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_STEPS = 1000
MAX_RUNS = 100_000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(v: Any) -> float:
    """``90``, ``"90s"``, ``"15m"``, ``"6h"``, ``"2d"`` -> seconds."""
    if isinstance(v, bool):
        raise ValueError(f"expected a duration like 90s, 15m, 6h, got {show(v)}")
    if isinstance(v, int | float):
        out = float(v)
    elif isinstance(v, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", v)):
        out = float(m[1]) * _UNITS[m[2] or "s"]
    else:
        raise ValueError(f"expected a duration like 90s, 15m, 6h, got {show(v)}")
    if not 0 < out < 10 * 365 * 86400:
        raise ValueError(f"a duration between 0 and 10 years, got {show(v)}")
    return out


def _name(v: Any, what: str) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise ValueError(f"a {what} name is 1 to 64 letters, digits, '_', '.' or '-', got {show(v)}")
    return v


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str
    submit: list[str] = Field(min_length=1, max_length=MAX_RUNS)
    after: list[str] | None = None  # None: the step before
    fraction: float = Field(1.0, gt=0.0, le=1.0)
    gate: bool = False
    sites: list[str] | None = None
    exclude: list[str] = []

    @field_validator("name")
    @classmethod
    def _n(cls, v: Any) -> str:
        return _name(v, "step")

    @field_validator("sites", "exclude")
    @classmethod
    def _sites(cls, v: Any) -> Any:
        if v is not None:
            for s in v:
                _name(s, "site")
        return v

    @field_validator("submit")
    @classmethod
    def _submit(cls, v: list[str]) -> list[str]:
        for s in v:
            if not s or "\0" in s:
                raise ValueError(f"a submit config path, got {show(s)}")
        return v


class CampaignSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    name: str = Field(alias="campaign")
    owner: str = Field(default_factory=lambda: getpass.getuser())
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    share: float = Field(1.0, gt=0.0, le=1e6)
    on_site_down: Literal["redispatch", "hold"] = Field("redispatch", alias="onSiteDown")
    stuck_after: float = Field(6 * 3600.0, alias="stuckAfter")
    steps: list[StepSpec] = Field(min_length=1, max_length=MAX_STEPS)
    #: for 'campaign simulate': job durations, failure and preemption rates, outages (see simulate.py)
    simulation: dict[str, Any] = {}

    @field_validator("name")
    @classmethod
    def _n(cls, v: Any) -> str:
        return _name(v, "campaign")

    @field_validator("owner")
    @classmethod
    def _owner(cls, v: Any) -> str:
        if not isinstance(v, str) or not 0 < len(v) <= 128 or any(c in v for c in "\0\n\r"):
            raise ValueError(f"an owner name of 1 to 128 characters, got {show(v)}")
        return v

    @field_validator("stuck_after", mode="before")
    @classmethod
    def _stuck(cls, v: Any) -> float:
        return seconds(v)

    @model_validator(mode="after")
    def _graph(self) -> CampaignSpec:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            if step.name in seen:
                raise ValueError(f"steps[{i}].name: step '{step.name}' appears twice")
            for dep in self.after(i):
                if dep not in seen:
                    known = [s.name for s in self.steps]
                    hint = ("it must come before this step" if dep in known
                            else f"no such step{_did_you_mean(dep, known)}")
                    raise ValueError(f"steps[{i}].after: '{dep}': {hint}")
            if step.sites is not None and set(step.sites) <= set(step.exclude):
                raise ValueError(f"steps[{i}].exclude: excludes every pinned site")
            seen.add(step.name)
        return self

    def after(self, i: int) -> list[str]:
        """The steps step ``i`` waits for (explicit, or the step before it)."""
        step = self.steps[i]
        if step.after is not None:
            return list(step.after)
        return [self.steps[i - 1].name] if i > 0 else []


def campaign_from_data(data: Any, path: Path) -> CampaignSpec:
    """A campaign from loaded YAML; submit paths made absolute (relative to the campaign file)."""
    check_plain(data, lambda key, problem: _fail(path, key or "(top)", problem))
    if not isinstance(data, dict):
        raise _fail(path, "(top)", f"expected a mapping with 'campaign' and 'steps', got {show(data)}")
    allowed = [f.alias or n for n, f in CampaignSpec.model_fields.items()]
    for key in data:
        if key not in allowed:
            raise _fail(path, str(key), f"unknown key{_did_you_mean(str(key), allowed)}")
    try:
        spec = CampaignSpec.model_validate(data)
    except ValidationError as exc:
        loc, problem = _pydantic_problem(exc)
        if problem.startswith("steps[") and ": " in problem:  # a check across steps names its own key
            loc, problem = "." + problem.split(": ", 1)[0], problem.split(": ", 1)[1]
        key = {".campaign": "campaign", ".onSiteDown": "onSiteDown"}.get(loc, loc.lstrip("."))
        raise _fail(path, key or "(top)", problem) from None
    base = path.resolve().parent
    steps = [s.model_copy(update={"submit": [str((base / p).resolve()) for p in s.submit]}) for s in spec.steps]
    return spec.model_copy(update={"steps": steps})


def load_campaign(path: Path, check_configs: bool = True) -> CampaignSpec:
    """Read and check a campaign file (and, by default, every submit config it names: a config error
    is reported naming that config's file and key)."""
    path = Path(path)
    spec = campaign_from_data(read_yaml(path, "a campaign file"), path)
    if check_configs:
        from batchprod.config.loader import load_config

        for i, step in enumerate(spec.steps):
            for j, cfg in enumerate(step.submit):
                if not Path(cfg).is_file():
                    raise _fail(path, f"steps[{i}].submit[{j}]", f"no such file: {cfg}")
                load_config(cfg)  # a ConfigError names the config and its key
    return spec


def dump(spec: CampaignSpec) -> str:
    return spec.model_dump_json(by_alias=True)


def parse(text: str) -> CampaignSpec:
    """A spec as stored in the database (already checked when it was created)."""
    try:
        return CampaignSpec.model_validate_json(text)
    except ValidationError as exc:  # a database edited by hand
        raise ConfigError(f"stored campaign spec is damaged: {_pydantic_problem(exc)[1]}") from None
