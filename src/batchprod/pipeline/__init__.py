"""Pipelines: task definitions with dataset types, dimensions and payloads.

Exports resolve lazily, so the job wrapper (which needs only ``pipeline.context``) does not import
YAML and the pipeline loader at every job start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchprod.pipeline.pipeline import Pipeline, TaskDef, check_config_labels, load_pipeline

__all__ = ["Pipeline", "TaskDef", "check_config_labels", "load_pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from batchprod.pipeline import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'batchprod.pipeline' has no attribute {name!r}")
