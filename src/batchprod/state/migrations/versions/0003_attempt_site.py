"""Attempts say on which site they ran (one engine places attempts on several sites).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("attempt", sa.Column("site", sa.String))


def downgrade() -> None:
    with op.batch_alter_table("attempt") as batch:
        batch.drop_column("site")
