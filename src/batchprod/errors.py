"""One exception hierarchy: the CLI turns any BatchprodError into one line and a non-zero exit."""

from __future__ import annotations


class BatchprodError(Exception):
    """Base of every error batchprod reports to a user (no traceback shown)."""

    exit_code = 2


class ConfigError(BatchprodError):
    """A submit or pipeline YAML is wrong: bad key, type, missing file or undefined variable."""


class QueryError(BatchprodError):
    """A data query does not parse or names an unknown dimension."""


class PipelineError(BatchprodError):
    """A pipeline is inconsistent: cycle, dataset type produced twice, unproducible input."""


class GraphError(BatchprodError):
    """A quantum graph cannot be built or read."""


class WorkflowError(BatchprodError):
    """A generic workflow cannot be built (e.g. clustering creates a cycle)."""


class RunError(BatchprodError):
    """A run cannot be found, started, cancelled or restarted."""
