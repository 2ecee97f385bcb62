"""batchprod: batch production of scientific data-processing pipelines."""

from batchprod.errors import (
    BatchprodError,
    ConfigError,
    GraphError,
    PipelineError,
    QueryError,
    RunError,
    WorkflowError,
)

__version__ = "0.1.0"

__all__ = [
    "BatchprodError",
    "ConfigError",
    "GraphError",
    "PipelineError",
    "QueryError",
    "RunError",
    "WorkflowError",
    "__version__",
]
