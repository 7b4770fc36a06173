"""many API keys per account, disabled accounts, reasons on ledger rows

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

import textgen.storage.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", textgen.storage.tables.UTCDateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", textgen.storage.tables.UTCDateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", textgen.storage.tables.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_api_keys_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_index("ix_api_keys_account", "api_keys", ["account_id", "created_at"], unique=False)

    # Each account's one key becomes its first API key (same hash, so clients keep working).
    bind = op.get_bind()
    existing = bind.execute(sa.text("SELECT id, key_hash, key_prefix, created_at FROM accounts")).all()
    keys = sa.table(
        "api_keys",
        sa.column("id", sa.String),
        sa.column("account_id", sa.Integer),
        sa.column("key_hash", sa.String),
        sa.column("prefix", sa.String),
        sa.column("created_at", sa.String if bind.dialect.name == "sqlite" else sa.DateTime(timezone=True)),
    )
    if existing:
        op.bulk_insert(
            keys,
            [
                {
                    "id": "key_" + secrets.token_hex(12),
                    "account_id": row.id,
                    "key_hash": row.key_hash,
                    "prefix": row.key_prefix,
                    "created_at": row.created_at,
                }
                for row in existing
            ],
        )

    # Plain ALTER TABLE on SQLite too: a batch copy of `accounts` would trip the foreign keys pointing at it.
    op.execute("ALTER TABLE accounts DROP COLUMN key_hash")
    op.execute("ALTER TABLE accounts DROP COLUMN key_prefix")
    op.execute("ALTER TABLE accounts ADD COLUMN disabled BOOLEAN DEFAULT false NOT NULL")
    op.execute("ALTER TABLE ledger ADD COLUMN reason VARCHAR(255)")


def downgrade() -> None:
    raise NotImplementedError("0002 is not reversible: accounts may have several keys")
