"""Workload management: campaigns (steps, runs), site states with their evidence, operator events and
incidents.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
TABLES = ("campaign", "campaign_step", "campaign_run", "site_state", "ops_event", "incident")


def upgrade() -> None:
    op.create_table(
        "campaign",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("owner", sa.String, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("share", sa.Float, nullable=False),  # fair-share target among campaigns of equal priority
        sa.Column("state", sa.String, nullable=False),  # planned running paused done failed cancelled
        sa.Column("spec", sa.Text, nullable=False),  # JSON: the campaign file as validated
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("updated", sa.Float, nullable=False),
        sa.Column("message", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_campaign"),
        sa.UniqueConstraint("name", name="uq_campaign_name"),
    )
    op.create_table(
        "campaign_step",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("campaign_id", sa.Integer, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("name", sa.String, nullable=False),
        sa.Column("state", sa.String, nullable=False),  # waiting gated running done failed cancelled
        sa.Column("released", sa.Float),  # when an operator released its gate
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("message", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_step"),
        sa.UniqueConstraint("campaign_id", "name", name="uq_campaign_step_name"),
    )
    op.create_table(
        "campaign_run",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("campaign_id", sa.Integer, nullable=False),
        sa.Column("step_id", sa.Integer, nullable=False),
        sa.Column("config", sa.String, nullable=False),
        sa.Column("submit_dir", sa.String),
        sa.Column("state", sa.String, nullable=False),  # planned, a RunState, or failed to prepare
        sa.Column("n_jobs", sa.Integer),
        sa.Column("done", sa.Integer),
        sa.Column("failed", sa.Integer),
        sa.Column("message", sa.String),
        sa.Column("updated", sa.Float),
        sa.PrimaryKeyConstraint("id", name="pk_campaign_run"),
        sa.Index("ix_campaign_run_step", "step_id"),
    )
    op.create_table(
        "site_state",
        sa.Column("name", sa.String, nullable=False),
        sa.Column("state", sa.String, nullable=False),  # online degraded draining down probing
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("evidence", sa.String),
        sa.Column("stats", sa.Text),  # JSON: running, queued, preempted, failure rate, skips by reason
        sa.Column("updated", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_site_state"),
    )
    op.create_table(
        "ops_event",
        sa.Column("id", _ID, nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("kind", sa.String, nullable=False),  # campaign step run site incident
        sa.Column("subject", sa.String, nullable=False),
        sa.Column("state", sa.String, nullable=False),
        sa.Column("message", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_ops_event"),
    )
    op.create_table(
        "incident",
        sa.Column("id", sa.Integer, nullable=False),
        sa.Column("kind", sa.String, nullable=False),  # job_failed site_down site_degraded step_stuck
        sa.Column("signature", sa.String, nullable=False),
        sa.Column("campaign", sa.String, nullable=False),  # '' when none
        sa.Column("site", sa.String),
        sa.Column("state", sa.String, nullable=False),  # open resolved
        sa.Column("first", sa.Float, nullable=False),
        sa.Column("last", sa.Float, nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("evidence", sa.Text),
        sa.Column("affected", sa.Text),  # JSON: a sample of affected jobs / runs
        sa.Column("delivered", sa.Integer, nullable=False, default=0),  # hook deliveries that succeeded
        sa.Column("hook_error", sa.String),
        sa.PrimaryKeyConstraint("id", name="pk_incident"),
        sa.UniqueConstraint("kind", "signature", "campaign", name="uq_incident_group"),
    )


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)
