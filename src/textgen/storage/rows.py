"""What the storage layer returns: one frozen row type per table read, and the outcome it records."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from textgen.states import DeliveryStatus, TaskMode, TaskStatus


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class AccountRow:
    id: int
    api_id: str
    name: str
    balance: int
    rate_limit: int
    webhook_secret: str
    webhook_secret_previous: str | None
    webhook_secret_previous_until: dt.datetime | None
    created_at: dt.datetime
    disabled: bool

    def signing_secrets(self, now: dt.datetime) -> list[str]:
        secrets = [self.webhook_secret]
        until = self.webhook_secret_previous_until
        if self.webhook_secret_previous and until is not None and until > now:
            secrets.append(self.webhook_secret_previous)
        return secrets


@dataclass(frozen=True, slots=True)
class TaskRow:
    id: str
    account_id: int
    model_name: str
    mode: TaskMode
    status: TaskStatus
    request: dict[str, Any]
    webhook_url: str | None
    response_text: str
    response_function_calls: list[dict[str, Any]]
    failed_reason: str
    finish_reason: str | None
    input_tokens: int
    output_tokens: int
    credits_reserved: int
    credits_used: int
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    attempts: int
    created_at: dt.datetime
    updated_at: dt.datetime
    cancel_requested: bool = False


@dataclass(slots=True)
class Outcome:
    """How a task ended: what the model produced and what it costs."""

    status: TaskStatus  # DONE or FAILED
    response_text: str = ""
    function_calls: list[dict[str, Any]] = field(default_factory=list)
    failed_reason: str = ""
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0  # micro-credits to charge

    @classmethod
    def failed(cls, reason: str) -> Outcome:
        return cls(status=TaskStatus.FAILED, failed_reason=reason)


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: dt.datetime
    id: str


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    balance: int
    ledger_sum: int


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    task_id: str
    account_id: int
    url: str
    payload: str
    status: DeliveryStatus
    attempt_count: int
    next_attempt_at: dt.datetime | None
    locked_by: str | None
    locked_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AttemptRow:
    id: int
    delivery_id: str
    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    next_attempt_at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryHistory:
    """A delivery (without its payload or lock) and its attempts, oldest first."""

    delivery: DeliveryRow
    attempts: list[AttemptRow]


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One delivery attempt and what it leads to: ``outcome`` is the delivery's status afterwards."""

    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    outcome: DeliveryStatus
    next_attempt_at: dt.datetime | None


_ACCOUNT_FIELDS = tuple(AccountRow.__dataclass_fields__)


def account_row(row: sa.Row[Any]) -> AccountRow:
    m = row._mapping
    return AccountRow(*(m[name] for name in _ACCOUNT_FIELDS))


def task_row(row: sa.Row[Any]) -> TaskRow:
    m = dict(row._mapping)
    m["mode"] = TaskMode(m["mode"])
    m["status"] = TaskStatus(m["status"])
    return TaskRow(**m)


def delivery_row(row: sa.Row[Any]) -> DeliveryRow:
    m = dict(row._mapping)
    m["status"] = DeliveryStatus(m["status"])
    return DeliveryRow(**m)


def attempt_row(row: sa.Row[Any]) -> AttemptRow:
    return AttemptRow(**row._mapping)


def task_values(task: TaskRow) -> dict[str, Any]:
    return {name: getattr(task, name) for name in TaskRow.__dataclass_fields__}
