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

import re
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import yaml

from batchprod.errors import ConfigError, PipelineError

_TASK_KEYS = {"python", "command", "dimensions", "inputs", "outputs", "config", "description"}
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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


def _names(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and _NAME.match(v) for v in value):
        raise ConfigError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def load_pipeline(path: str | Path) -> Pipeline:
    """Read and validate a pipeline YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: pipeline file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ConfigError(f"{p}: key 'tasks': a pipeline needs a mapping of at least one task")
    unknown = set(data) - {"tasks", "description"}
    if unknown:
        raise ConfigError(f"{p}: unknown key '{sorted(unknown)[0]}'")
    tasks = []
    for label, spec in data["tasks"].items():
        where = f"{p}: key 'tasks.{label}'"

        def at(sub: str, label: str = str(label)) -> str:
            return f"{p}: key 'tasks.{label}.{sub}'"

        if not _NAME.match(str(label)):
            raise ConfigError(f"{where}: task label must be an identifier")
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping")
        bad = set(spec) - _TASK_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown key '{sorted(bad)[0]}'")
        if bool(spec.get("python")) == bool(spec.get("command")):
            raise ConfigError(f"{where}: give exactly one of 'python' (module:function) or 'command'")
        py = spec.get("python")
        if py is not None and (not isinstance(py, str) or not re.fullmatch(r"[\w.]+:[\w.]+", py)):
            raise ConfigError(f"{at('python')}: expected 'module:function', got {py!r}")
        cfg = spec.get("config") or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{at('config')}: expected a mapping")
        outputs = _names(spec.get("outputs"), f"{at('outputs')}")
        if not outputs:
            raise ConfigError(f"{at('outputs')}: a task must produce at least one dataset type")
        tasks.append(
            TaskDef(
                label=str(label),
                dimensions=_names(spec.get("dimensions"), f"{at('dimensions')}"),
                inputs=_names(spec.get("inputs"), f"{at('inputs')}"),
                outputs=outputs,
                python=py,
                command=spec.get("command"),
                config=cfg,
            )
        )
    return Pipeline(tasks, description=str(data.get("description", "")), path=p)
