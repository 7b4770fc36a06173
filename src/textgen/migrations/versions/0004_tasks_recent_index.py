"""an index on (status, updated_at): the claim weighs each account's recent use of the workers

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_status_updated", "tasks", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_updated", table_name="tasks")
