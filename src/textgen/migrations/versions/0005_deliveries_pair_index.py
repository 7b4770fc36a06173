"""an index on (status, account_id, url, next_attempt_at, id): a webhook claim steps through the (account, URL)
pairs with pending deliveries and reads each pair's oldest due ones, instead of ranking the whole backlog

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_webhook_deliveries_pair",
        "webhook_deliveries",
        ["status", "account_id", "url", "next_attempt_at", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_pair", table_name="webhook_deliveries")
