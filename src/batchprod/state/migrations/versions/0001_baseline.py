"""Baseline: the per-run state file as batchprod wrote it before Alembic (one run per database).

A file of that time has no version table: batchprod recognises it and stamps it with this revision.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

from batchprod.state.migrations import baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    baseline.metadata.create_all(op.get_bind())


def downgrade() -> None:
    baseline.metadata.drop_all(op.get_bind())
