"""Table definitions (SQLAlchemy Core). Alembic migrations create exactly these."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite keeps naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("api_id", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("balance", sa.BigInteger, nullable=False),
    sa.Column("rate_limit", sa.Integer, nullable=False),
    sa.Column("webhook_secret", sa.String(128), nullable=False),
    sa.Column("webhook_secret_previous", sa.String(128), nullable=True),
    sa.Column("webhook_secret_previous_until", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.CheckConstraint("balance >= 0", name="ck_accounts_balance_nonnegative"),
)

# An account's API keys: any live (not revoked) key authenticates as the account. Only hashes are stored.
api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("key_hash", sa.String(128), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("last_used_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Index("ix_api_keys_account", "account_id", "created_at"),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("mode", sa.String(8), nullable=False),  # async | sync | stream
    sa.Column("status", sa.String(8), nullable=False),  # pending | running | done | failed
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("webhook_url", sa.String(2048), nullable=True),
    sa.Column("response_text", sa.Text, nullable=False, server_default=""),
    sa.Column("response_function_calls", sa.JSON, nullable=False),
    sa.Column("failed_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("finish_reason", sa.String(32), nullable=True),
    sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("credits_reserved", sa.BigInteger, nullable=False),
    sa.Column("credits_used", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Someone asked to cancel the task while another process ran it: that process stops it.
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.text("false")),
    sa.Index("ix_tasks_status_created", "status", "created_at"),
    sa.Index("ix_tasks_status_updated", "status", "updated_at"),
    sa.Index("ix_tasks_account_created", "account_id", "created_at", "id"),
)

ledger = sa.Table(
    "ledger",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("task_id", sa.String(36), nullable=True),
    sa.Column("kind", sa.String(16), nullable=False),  # grant | adjust | reserve | settle | release
    sa.Column("amount", sa.BigInteger, nullable=False),  # signed micro-credits
    sa.Column("balance_after", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("reason", sa.String(255), nullable=True),  # why an operator credited or debited
    sa.Index("ix_ledger_account", "account_id", "id"),
    sa.Index("ix_ledger_task", "task_id"),
)

webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the webhook-id header, stable across retries
    sa.Column("task_id", sa.String(36), sa.ForeignKey("tasks.id"), nullable=False),
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("url", sa.String(2048), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("status", sa.String(12), nullable=False),  # pending | delivered | failed
    sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Column("locked_by", sa.String(64), nullable=True),
    sa.Column("locked_until", UTCDateTime, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    sa.Index("ix_webhook_deliveries_pair", "status", "account_id", "url", "next_attempt_at", "id"),
    sa.Index("ix_webhook_deliveries_task", "task_id"),
)

webhook_attempts = sa.Table(
    "webhook_attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("delivery_id", sa.String(64), sa.ForeignKey("webhook_deliveries.id"), nullable=False),
    sa.Column("attempted_at", UTCDateTime, nullable=False),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("next_attempt_at", UTCDateTime, nullable=True),
    sa.Index("ix_webhook_attempts_delivery", "delivery_id", "id"),
)

# One create (or stream) per (account, Idempotency-Key) until it expires: the unique key makes it safe across
# processes. ``task_id`` is set once the task exists, ``status_code``/``response`` once its answer is known.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("key", sa.String(255), primary_key=True),
    sa.Column("request_hash", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(36), nullable=True),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("response", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
    sa.Index("ix_idempotency_keys_expires", "expires_at"),
)
