"""Many runs per database: every table keyed by run; the append-only event table.

job, attempt, context, output and execution get a ``run_id`` (the one run of a per-run file) in their
keys; a run is its submit directory (unique; output run names repeat across repositories); ``event`` receives one row per job status change from a trigger, in the
transaction that changes it. The tables are rebuilt (SQLite cannot change a primary key in place):
old ones are renamed aside, new ones created, rows copied, old ones dropped.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

REBUILT = ("output", "attempt", "context", "execution", "job")  # dependents first

TRIGGER = {
    "sqlite": [
        "CREATE TRIGGER trg_job_event AFTER UPDATE OF status ON job FOR EACH ROW "
        "WHEN OLD.status IS NOT NEW.status BEGIN "
        "INSERT INTO event (run_id, time, job_id, attempt, state, message) VALUES (NEW.run_id, "
        "COALESCE(NEW.updated, (julianday('now') - 2440587.5) * 86400.0), NEW.id, NEW.attempts, NEW.status, "
        "NEW.message); END",
    ],
    "postgresql": [
        "CREATE FUNCTION batchprod_job_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "INSERT INTO event (run_id, time, job_id, attempt, state, message) VALUES (NEW.run_id, "
        "COALESCE(NEW.updated, extract(epoch from clock_timestamp())), NEW.id, NEW.attempts, NEW.status, "
        "NEW.message); RETURN NULL; END $$",
        "CREATE TRIGGER trg_job_event AFTER UPDATE OF status ON job FOR EACH ROW "
        "WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION batchprod_job_event()",
    ],
}


def _create_tables() -> None:
    op.create_table(
        "job",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("label", sa.String, nullable=False),
        sa.Column("n_quanta", sa.Integer, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("status", sa.String, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("retries", sa.Integer, nullable=False),
        sa.Column("preemptions", sa.Integer, nullable=False),
        sa.Column("infra_failures", sa.Integer, nullable=False),
        sa.Column("request_memory", sa.Integer, nullable=False),
        sa.Column("failure_class", sa.String),
        sa.Column("exit_code", sa.Integer),
        sa.Column("message", sa.String),
        sa.Column("updated", sa.Float),
        sa.PrimaryKeyConstraint("run_id", "id", name="pk_job"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "attempt",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("number", sa.Integer, nullable=False),
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
        sa.PrimaryKeyConstraint("run_id", "job_id", "number", name="pk_attempt"),
        sa.ForeignKeyConstraint(["run_id", "job_id"], ["job.run_id", "job.id"], name="fk_attempt_job"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "context",
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("hash", sa.String, nullable=False),
        sa.Column("record", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "hash", name="pk_context"),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "execution",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("start", sa.Float, nullable=False),
        sa.Column("end", sa.Float),
        sa.Column("host", sa.String),
        sa.Column("pid", sa.Integer),
        sa.PrimaryKeyConstraint("id", name="pk_execution"),
    )
    op.create_table(
        "output",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("node_id", sa.String, nullable=False),
        sa.Column("dataset_type", sa.String, nullable=False),
        sa.Column("data_id", sa.String, nullable=False),
        sa.Column("path", sa.String, nullable=False),
        sa.Column("size", sa.BigInteger),
        sa.Column("checksum", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_output"),
        sa.ForeignKeyConstraint(["run_id", "job_id"], ["job.run_id", "job.id"], name="fk_output_job"),
    )
    op.create_table(
        "event",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False),
        sa.Column("run_id", sa.Integer, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("message", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_event"),
    )


def _create_indexes() -> None:
    op.create_index("ix_run_name", "run", ["name"])
    op.create_index("uq_run_submit_dir", "run", ["submit_dir"], unique=True)
    op.create_index("uq_job_run_id_name", "job", ["run_id", "name"], unique=True)
    op.create_index("ix_job_run_id_status", "job", ["run_id", "status"])
    op.create_index("ix_execution_run_id", "execution", ["run_id"])
    op.create_index("ix_output_run_id_job_id", "output", ["run_id", "job_id"])
    op.create_index("ix_output_run_id_path", "output", ["run_id", "path"])
    op.create_index("ix_output_run_id_type_data_id", "output", ["run_id", "dataset_type", "data_id"])
    op.create_index("ix_event_run_id_id", "event", ["run_id", "id"])


COPY = {
    "job": "id, name, label, n_quanta, priority, status, attempts, retries, preemptions, infra_failures, "
           "request_memory, failure_class, exit_code, message, updated",
    "attempt": 'job_id, number, status, failure_class, exit_code, signal, request_memory, peak_rss_mb, cpu_s, '
               'wall_s, host, pid, handle, start, "end", stdout, stderr, message, error_line, context',
    "context": "hash, record",
    "execution": 'id, start, "end", host, pid',
    "output": "id, job_id, node_id, dataset_type, data_id, path, size, checksum",
}


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    # the one run of a per-run database (batchprod wrote it with id 1)
    rid = bind.exec_driver_sql("SELECT min(id) FROM run").scalar() or 1
    for t in REBUILT:
        op.rename_table(t, f"{t}_0001")
    _create_tables()
    for t in reversed(REBUILT):  # parents first
        cols = COPY[t]
        bind.exec_driver_sql(f"INSERT INTO {t} (run_id, {cols}) SELECT {int(rid)}, {cols} FROM {t}_0001")
    for t in REBUILT:
        op.drop_table(f"{t}_0001")
    _create_indexes()
    if dialect == "postgresql":  # explicit ids were copied: serials go on after them
        for t in ("run", "execution", "output"):
            bind.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                                 f"COALESCE((SELECT max(id) FROM {t}), 0) + 1, false)")
    for stmt in TRIGGER[dialect]:
        bind.exec_driver_sql(stmt)


def downgrade() -> None:
    raise NotImplementedError("a database of many runs cannot go back to one run per file")
