"""Pipeline definitions: tasks with input/output dataset types, dimensions and a payload.

A pipeline YAML looks like::

    description: demo
    tasks:
      calibrate:
        python: batchprod.demo.tasks:calibrate      # or: command: "mytool {inputs.raw} {outputs.calexp}"
        dimensions: [visit, detector]
        inputs: [raw]
        outputs: [calexp]
        config: {threshold: 5.0}
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator, model_validator

from batchprod.config.imports import check_python_ref
from batchprod.config.keys import NAME_RE, check_name, python_ref
from batchprod.config.safe_yaml import check_plain, is_file, one_line, read_yaml, show
from batchprod.errors import ConfigError, PipelineError

if TYPE_CHECKING:
    from batchprod.config import BpsConfig

_TASK_KEYS = {"python", "command", "dimensions", "inputs", "outputs", "config", "description"}
#: Dimension names end up in SQL column lists and data IDs: identifiers only.
_DIMENSION = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_NAME = NAME_RE  # task labels and dataset types (kept under its old name)
MAX_COMMAND_CHARS = 65536


@dataclass(frozen=True)
class TaskDef:
    """One pipeline task: what it reads, what it writes, over which dimensions, and how to run it."""

    label: str
    dimensions: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    python: str | None = None
    command: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def payload(self) -> str:
        return self.python or self.command or ""


@dataclass
class Pipeline:
    """An ordered, validated set of tasks (topological order by dataset dependencies)."""

    tasks: list[TaskDef]
    description: str = ""
    path: Path | None = None

    def __post_init__(self) -> None:
        self.by_label = {t.label: t for t in self.tasks}
        self.producer: dict[str, str] = {}
        for t in self.tasks:
            for out in t.outputs:
                if out in self.producer:
                    raise PipelineError(
                        f"{self.path or '<pipeline>'}: dataset type '{out}' is produced by both "
                        f"'{self.producer[out]}' and '{t.label}'"
                    )
                self.producer[out] = t.label
        ts: TopologicalSorter[str] = TopologicalSorter()
        for t in self.tasks:
            ts.add(t.label, *[self.producer[i] for i in t.inputs if i in self.producer])
        try:
            order = list(ts.static_order())
        except CycleError as exc:
            cycle = " -> ".join(exc.args[1])
            raise PipelineError(f"{self.path or '<pipeline>'}: pipeline has a cycle: {cycle}") from None
        self.tasks = [self.by_label[label] for label in order]

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.tasks]

    def overall_inputs(self) -> list[str]:
        """Dataset types that no task produces: they must come from the data registry."""
        seen: dict[str, None] = {}
        for t in self.tasks:
            for i in t.inputs:
                if i not in self.producer:
                    seen[i] = None
        return list(seen)

    def dataset_dimensions(self, name: str) -> tuple[str, ...] | None:
        """Dimensions of a produced dataset type (those of its task), None if not produced here."""
        label = self.producer.get(name)
        return self.by_label[label].dimensions if label else None


def _name_list(check: Callable[[str], Any]) -> BeforeValidator:
    """A list of names, given as a YAML list or a comma-separated string, each checked."""

    def conv(value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError(f"expected a list of names, got {show(value)}")
        for v in value:
            try:
                check(v)
            except ValueError as exc:
                raise ValueError(f"expected a list of names; {exc}") from None
        return tuple(value)

    return BeforeValidator(conv)


def _dimension(v: Any) -> str:
    if not isinstance(v, str) or not _DIMENSION.fullmatch(v):
        raise ValueError(f"dimension {show(v)} must be an identifier of at most 64 characters")
    return v


DatasetTypes = Annotated[tuple[str, ...], _name_list(lambda v: check_name(v, "dataset type"))]
Dimensions = Annotated[tuple[str, ...], _name_list(_dimension)]


class TaskSpec(BaseModel):
    """One task as written in the pipeline YAML (validated; unknown keys refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    python: str | None = None
    command: str | None = None
    dimensions: Dimensions = ()
    inputs: DatasetTypes = ()
    outputs: DatasetTypes = ()
    config: dict[str, Any] = {}
    description: str = ""

    @field_validator("python")
    @classmethod
    def _python(cls, v: str | None) -> str | None:
        return None if v is None else python_ref(v)

    @field_validator("command")
    @classmethod
    def _command(cls, v: str | None) -> str | None:
        if v is not None and len(v) > MAX_COMMAND_CHARS:
            raise ValueError(f"longer than {MAX_COMMAND_CHARS} characters")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("a task must produce at least one dataset type")
        return v

    @model_validator(mode="after")
    def _one_payload(self) -> TaskSpec:
        if bool(self.python) == bool(self.command):
            raise ValueError("give exactly one of 'python' (module:function) or 'command'")
        return self


def _spec_error(p: Path, label: str, exc: ValidationError) -> ConfigError:
    """The first problem pydantic found, as '<file>: key 'tasks.<label>[.<key>]': <problem>'."""
    err = exc.errors(include_url=False)[0]
    loc = [str(x) for x in err["loc"]]
    if err["type"] == "extra_forbidden":
        key = loc[0]
        return ConfigError(
            f"{p}: key 'tasks.{label}': unknown key '{one_line(key, 80)}'{_suggest(key, _TASK_KEYS)}"
        )
    ctx_error = (err.get("ctx") or {}).get("error")
    problem = str(ctx_error) if ctx_error is not None else err["msg"]
    if err["type"] in ("string_type", "dict_type", "missing"):
        problem = f"{problem}, got {show(err.get('input'))}" if err["type"] != "missing" else problem
    # the key is the first field of the location (a deeper location is inside config: say so)
    field_key = next((x for x in loc if x in _TASK_KEYS), None)
    where = f"tasks.{label}.{field_key}" if field_key else f"tasks.{label}"
    return ConfigError(f"{p}: key '{where}': {one_line(problem)}")


def _suggest(key: str, allowed: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6) if len(key) < 100 else []
    return f" (did you mean '{close[0]}'?)" if close else ""


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline YAML.

    Every problem is one ConfigError line naming the file and the key: bad YAML (also non-UTF-8,
    too deep, alias bombs, duplicate keys, NUL characters), unknown keys, unsafe labels or dataset
    type names, a ``python:`` payload that does not import, non-JSON task config.
    """
    p = Path(path)
    if not is_file(p):
        raise ConfigError(f"{one_line(p)}: pipeline file not found")
    data = read_yaml(p) or {}
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ConfigError(f"{p}: key 'tasks': a pipeline needs a mapping of at least one task")
    unknown = sorted(str(k) for k in set(data) - {"tasks", "description"})
    if unknown:
        raise ConfigError(f"{p}: unknown key '{one_line(unknown[0], 80)}'{_suggest(unknown[0], ['tasks', 'description'])}")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ConfigError(f"{p}: key 'description': expected a string, got {show(description)}")
    tasks = []
    for label, spec in data["tasks"].items():
        try:
            check_name(label, "task label")
        except ValueError as exc:
            raise ConfigError(f"{p}: key 'tasks': {exc}") from None
        where = f"{p}: key 'tasks.{label}'"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping, got {show(spec, 40)}")
        try:
            ts = TaskSpec.model_validate(spec)
        except ValidationError as exc:
            raise _spec_error(p, label, exc) from None
        check_plain(
            ts.config,
            lambda key, problem, label=label: ConfigError(f"{p}: key 'tasks.{label}.config{'.' if key else ''}{one_line(key, 80)}': {problem}"),
            allow_dates=False,
        )
        if ts.python:
            check_python_ref(ts.python, f"{p}: key 'tasks.{label}.python'")
        tasks.append(
            TaskDef(
                label=label,
                dimensions=ts.dimensions,
                inputs=ts.inputs,
                outputs=ts.outputs,
                python=ts.python,
                command=ts.command,
                config=dict(ts.config),
            )
        )
    return Pipeline(tasks, description=description, path=p)


def check_config_labels(cfg: BpsConfig, pipeline: Pipeline) -> None:
    """The task labels a submit config names (``pipetask.<label>``, ``cluster.<name>.pipetasks``)
    exist in the pipeline; each task is in one cluster at most; a cluster is not named like a task
    outside it (their jobs, logs and report rows would mix). ConfigError naming file and key."""
    from batchprod.config import Context
    from batchprod.config.keys import CLUSTER_KEYS

    labels = pipeline.labels
    has = one_line(f"(pipeline {pipeline.path or ''} has: {', '.join(labels)})", 200)
    if not has.endswith(")"):
        has += ")"
    for label in cfg.data.get("pipetask") or {}:
        if label not in pipeline.by_label:
            raise ConfigError(
                f"{cfg.where(f'pipetask.{label}')}: key 'pipetask.{label}': unknown task label '{label}' "
                f"{has}{_suggest(label, labels)}"
            )
    owner: dict[str, str] = {}
    for name, section in (cfg.data.get("cluster") or {}).items():
        keypath = f"cluster.{name}.pipetasks"
        where = f"{cfg.where(keypath if keypath in cfg.sources else f'cluster.{name}')}: key '{keypath}'"
        if "pipetasks" not in section:
            raise ConfigError(f"{where} is required")
        members = cfg.typed("pipetasks", CLUSTER_KEYS["pipetasks"], Context(cluster=name))
        if not members:
            raise ConfigError(f"{where}: lists no task")
        for lab in members:
            if lab not in pipeline.by_label:
                raise ConfigError(f"{where}: unknown task label '{one_line(lab, 80)}' {has}{_suggest(lab, labels)}")
            if lab in owner:
                raise ConfigError(f"{where}: task '{lab}' is in two clusters: '{owner[lab]}' and '{name}'")
            owner[lab] = name
        if name in pipeline.by_label and name not in members:
            raise ConfigError(
                f"{cfg.where(f'cluster.{name}')}: key 'cluster.{name}': cluster name '{name}' is the label of a "
                "task outside it; name the cluster differently"
            )
