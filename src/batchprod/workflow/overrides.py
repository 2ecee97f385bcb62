"""Job values changed after prepare (``restart -o``): applied over a frozen workflow's groups."""

from __future__ import annotations

from typing import Any

from batchprod.workflow.generic import GenericWorkflow


def override_targets(wf: GenericWorkflow, scope: str) -> list[int | None]:
    """Group indices (None = the final job) a restart override's scope reaches."""
    kind, _, name = scope.partition(".")
    if kind == "":
        return [*range(len(wf.groups)), None]
    if kind == "pipetask":
        return [i for i, g in enumerate(wf.groups) if name in g.labels]
    if kind == "cluster":
        return [i for i, g in enumerate(wf.groups) if g.name == name]
    return [None]  # finalJob


def apply_overrides(wf: GenericWorkflow, values: dict[str, Any]) -> None:
    from dataclasses import replace

    from batchprod.workflow.generic import Resources

    fields = {f: f for f in Resources.__dataclass_fields__}
    for dotted, value in values.items():
        scope, _, key = dotted.rpartition(".")
        attr = RESOURCE_FIELD[key]
        assert attr in fields
        for i in override_targets(wf, scope):
            if i is None:
                if wf.final is not None:
                    wf.final = replace(wf.final, resources=replace(wf.final.resources, **{attr: value}))
            else:
                g = wf.groups[i]
                wf.groups[i] = replace(g, resources=replace(g.resources, **{attr: value}))


#: config key -> Resources field, for what a restart may change
RESOURCE_FIELD = {
    "requestCpus": "request_cpus", "requestMemory": "request_memory", "requestWalltime": "request_walltime",
    "priority": "priority", "numberOfRetries": "number_of_retries", "memoryMultiplier": "memory_multiplier",
    "memoryLimit": "memory_limit", "maxPreemptions": "max_preemptions", "infraRetryDelay": "infra_retry_delay",
    "maxInfraRetries": "max_infra_retries",
}
