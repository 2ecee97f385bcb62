"""Reports over a run's state store."""

from batchprod.report.report import COLUMNS, render_table, run_status, summarize

__all__ = ["COLUMNS", "render_table", "run_status", "summarize"]
