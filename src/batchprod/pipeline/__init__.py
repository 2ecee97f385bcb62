"""Pipelines: task definitions with dataset types, dimensions and payloads."""

from batchprod.pipeline.pipeline import Pipeline, TaskDef, load_pipeline

__all__ = ["Pipeline", "TaskDef", "load_pipeline"]
