"""The schema of revision 0001 (the baseline): the per-run file as batchprod wrote it before
Alembic, one run per database. Frozen: never change it; change the schema in a new revision."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

sa.Table(
    "run", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String, nullable=False),
    sa.Column("submit_dir", sa.String, nullable=False),
    sa.Column("wms", sa.String, nullable=False),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("n_jobs", sa.Integer, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
    sa.Column("orchestrator_pid", sa.Integer),
    sa.Column("orchestrator_host", sa.String),
    sa.Column("orchestrator_start", sa.Float),
    sa.Column("message", sa.String),
)
sa.Table(
    "job", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String, nullable=False, unique=True),
    sa.Column("label", sa.String, nullable=False),
    sa.Column("n_quanta", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("status", sa.String, nullable=False, index=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("retries", sa.Integer, nullable=False),
    sa.Column("preemptions", sa.Integer, nullable=False),
    sa.Column("infra_failures", sa.Integer, nullable=False),
    sa.Column("request_memory", sa.Integer, nullable=False),
    sa.Column("failure_class", sa.String),
    sa.Column("exit_code", sa.Integer),
    sa.Column("message", sa.String),
    sa.Column("updated", sa.Float),
)
sa.Table(
    "attempt", metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("status", sa.String, nullable=False),
    sa.Column("failure_class", sa.String),
    sa.Column("exit_code", sa.Integer),
    sa.Column("signal", sa.Integer),
    sa.Column("request_memory", sa.Integer),
    sa.Column("peak_rss_mb", sa.Float),
    sa.Column("cpu_s", sa.Float),
    sa.Column("wall_s", sa.Float),
    sa.Column("host", sa.String),
    sa.Column("pid", sa.Integer),
    sa.Column("handle", sa.String),
    sa.Column("start", sa.Float),
    sa.Column("end", sa.Float),
    sa.Column("stdout", sa.String),
    sa.Column("stderr", sa.String),
    sa.Column("message", sa.String),
    sa.Column("error_line", sa.String),
    sa.Column("context", sa.String),
)
sa.Table(
    "context", metadata,
    sa.Column("hash", sa.String, primary_key=True),
    sa.Column("record", sa.Text, nullable=False),
)
sa.Table(
    "execution", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("start", sa.Float, nullable=False),
    sa.Column("end", sa.Float),
    sa.Column("host", sa.String),
    sa.Column("pid", sa.Integer),
)
sa.Table(
    "output", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False, index=True),
    sa.Column("node_id", sa.String, nullable=False),
    sa.Column("dataset_type", sa.String, nullable=False),
    sa.Column("data_id", sa.String, nullable=False),
    sa.Column("path", sa.String, nullable=False, index=True),
    sa.Column("size", sa.BigInteger),
    sa.Column("checksum", sa.String),
    sa.Index("ix_output_type_data_id", "dataset_type", "data_id"),
)
