"""The store: every persistence operation of the service, behind one object.

Credits move only here, always as a conditional update of the balance plus a ledger row in the same
transaction, so concurrent requests cannot overdraw an account and the ledger always sums to the balance.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from textgen.errors import InsufficientCredits, NotFound, StorageUnavailable
from textgen.notify import DELIVERIES_CHANNEL, TASKS_CHANNEL
from textgen.storage.tables import accounts, ledger, tasks, webhook_attempts, webhook_deliveries

TERMINAL = ("done", "failed")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class AccountRow:
    id: int
    api_id: str
    key_hash: str
    key_prefix: str
    name: str
    balance: int
    rate_limit: int
    webhook_secret: str
    webhook_secret_previous: str | None
    webhook_secret_previous_until: dt.datetime | None
    created_at: dt.datetime

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
    mode: str
    status: str
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


@dataclass(slots=True)
class Outcome:
    """How a task ended: what the model produced and what it costs."""

    status: str  # done | failed
    response_text: str = ""
    function_calls: list[dict[str, Any]] = field(default_factory=list)
    failed_reason: str = ""
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0  # micro-credits to charge


@dataclass(frozen=True, slots=True)
class Cursor:
    created_at: dt.datetime
    id: str


@dataclass(frozen=True, slots=True)
class LedgerSummary:
    balance: int
    ledger_sum: int


def _account(row: sa.Row[Any]) -> AccountRow:
    return AccountRow(**row._mapping)


def _task(row: sa.Row[Any]) -> TaskRow:
    return TaskRow(**row._mapping)


def webhook_payload(task: TaskRow) -> dict[str, Any]:
    """The guide's webhook body for a finished task."""
    return {
        "id": task.id,
        "status": task.status,
        "response_text": task.response_text,
        "response_function_calls": task.response_function_calls,
        "failed_reason": task.failed_reason,
        "credits_used": task.credits_used / 1_000_000,
    }


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        # Called after a transaction that queued a webhook delivery commits (wakes the in-process sender).
        self.delivery_listeners: list[Callable[[], None]] = []

    async def aclose(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """A transaction; driver failures leave as StorageUnavailable, never as raw driver errors."""
        try:
            async with self.engine.begin() as conn:
                yield conn
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            raise
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    async def _notify(self, conn: AsyncConnection, channel: str) -> None:
        """On PostgreSQL, wake listeners in every process once this transaction commits."""
        if self.is_postgres:
            await conn.execute(sa.select(sa.func.pg_notify(channel, "")))

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # ---- accounts -------------------------------------------------------------------------------

    async def create_account(
        self,
        *,
        api_id: str,
        key_hash: str,
        key_prefix: str,
        name: str,
        credits: int,
        rate_limit: int,
        webhook_secret: str,
    ) -> AccountRow:
        """Create an account and record its opening grant in the ledger."""
        now = utcnow()
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    accounts.insert()
                    .values(
                        api_id=api_id,
                        key_hash=key_hash,
                        key_prefix=key_prefix,
                        name=name,
                        balance=credits,
                        rate_limit=rate_limit,
                        webhook_secret=webhook_secret,
                        created_at=now,
                    )
                    .returning(*accounts.c)
                )
            ).one()
            await conn.execute(
                ledger.insert().values(
                    account_id=row.id, kind="grant", amount=credits, balance_after=credits, created_at=now
                )
            )
        return _account(row)

    async def count_accounts(self) -> int:
        async with self._tx() as conn:
            return int((await conn.execute(sa.select(sa.func.count()).select_from(accounts))).scalar_one())

    async def account_by_api_id(self, api_id: str) -> AccountRow | None:
        async with self._tx() as conn:
            row = (await conn.execute(sa.select(accounts).where(accounts.c.api_id == api_id))).first()
        return _account(row) if row else None

    async def account_by_id(self, account_id: int) -> AccountRow:
        async with self._tx() as conn:
            row = (await conn.execute(sa.select(accounts).where(accounts.c.id == account_id))).one()
        return _account(row)

    async def grant(self, api_id: str, amount: int) -> AccountRow:
        """Add (or, negative, remove) credits; the balance never goes below zero."""
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    accounts.update()
                    .where(accounts.c.api_id == api_id, accounts.c.balance + amount >= 0)
                    .values(balance=accounts.c.balance + amount)
                    .returning(*accounts.c)
                )
            ).first()
            if row is None:
                if (await conn.execute(sa.select(accounts.c.id).where(accounts.c.api_id == api_id))).first():
                    raise InsufficientCredits("the balance cannot go below zero")
                raise NotFound(f"no account with api_id {api_id!r}")
            await conn.execute(
                ledger.insert().values(
                    account_id=row.id,
                    kind="grant",
                    amount=amount,
                    balance_after=row.balance,
                    created_at=utcnow(),
                )
            )
        return _account(row)

    async def set_rate_limit(self, api_id: str, rpm: int) -> None:
        async with self._tx() as conn:
            await conn.execute(accounts.update().where(accounts.c.api_id == api_id).values(rate_limit=rpm))

    async def rotate_webhook_secret(self, api_id: str, new_secret: str, grace: dt.timedelta) -> AccountRow:
        """Make ``new_secret`` current; the old one keeps signing until the grace period ends."""
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    accounts.update()
                    .where(accounts.c.api_id == api_id)
                    .values(
                        webhook_secret_previous=accounts.c.webhook_secret,
                        webhook_secret_previous_until=utcnow() + grace,
                        webhook_secret=new_secret,
                    )
                    .returning(*accounts.c)
                )
            ).first()
        if row is None:
            raise NotFound(f"no account with api_id {api_id!r}")
        return _account(row)

    async def ledger_summary(self, account_id: int) -> LedgerSummary:
        async with self._tx() as conn:
            balance = (
                await conn.execute(sa.select(accounts.c.balance).where(accounts.c.id == account_id))
            ).scalar_one()
            total = (
                await conn.execute(
                    sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount), 0)).where(
                        ledger.c.account_id == account_id
                    )
                )
            ).scalar_one()
        return LedgerSummary(balance=int(balance), ledger_sum=int(total))

    # ---- tasks ----------------------------------------------------------------------------------

    async def create_task(
        self,
        *,
        account_id: int,
        model_name: str,
        mode: str,
        request: dict[str, Any],
        webhook_url: str | None,
        reserve: int,
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
    ) -> TaskRow:
        """Reserve ``reserve`` micro-credits and insert the task, atomically; 402 if the balance is short.

        With ``lease_owner`` the task starts ``running`` and leased to the caller (sync and stream modes).
        """
        now = utcnow()
        task_id = str(uuid.uuid4())
        async with self._tx() as conn:
            balance_after = (
                await conn.execute(
                    accounts.update()
                    .where(accounts.c.id == account_id, accounts.c.balance >= reserve)
                    .values(balance=accounts.c.balance - reserve)
                    .returning(accounts.c.balance)
                )
            ).scalar()
            if balance_after is None:
                raise InsufficientCredits(
                    f"not enough credits: this request may cost up to {reserve / 1_000_000:g} credits"
                )
            running = lease_owner is not None
            row = (
                await conn.execute(
                    tasks.insert()
                    .values(
                        id=task_id,
                        account_id=account_id,
                        model_name=model_name,
                        mode=mode,
                        status="running" if running else "pending",
                        request=request,
                        webhook_url=webhook_url,
                        response_text="",
                        response_function_calls=[],
                        failed_reason="",
                        credits_reserved=reserve,
                        credits_used=0,
                        lease_owner=lease_owner,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds) if running else None,
                        attempts=1 if running else 0,
                        created_at=now,
                        updated_at=now,
                    )
                    .returning(*tasks.c)
                )
            ).one()
            await conn.execute(
                ledger.insert().values(
                    account_id=account_id,
                    task_id=task_id,
                    kind="reserve",
                    amount=-reserve,
                    balance_after=balance_after,
                    created_at=now,
                )
            )
            if not running:
                await self._notify(conn, TASKS_CHANNEL)
        return _task(row)

    async def get_task(self, task_id: str, account_id: int | None = None) -> TaskRow:
        query = sa.select(tasks).where(tasks.c.id == task_id)
        if account_id is not None:
            query = query.where(tasks.c.account_id == account_id)
        async with self._tx() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return _task(row)

    async def list_tasks(
        self,
        account_id: int,
        *,
        limit: int,
        status: str | None = None,
        after: Cursor | None = None,
        before: Cursor | None = None,
    ) -> tuple[list[TaskRow], bool]:
        """Newest first. ``after`` pages towards older tasks, ``before`` towards newer ones.

        Returns the page and whether more rows exist beyond it in the paging direction.
        """
        key = sa.tuple_(tasks.c.created_at, tasks.c.id)
        query = sa.select(tasks).where(tasks.c.account_id == account_id)
        if status is not None:
            query = query.where(tasks.c.status == status)
        if before is not None:
            query = query.where(
                key > sa.tuple_(sa.literal(before.created_at, tasks.c.created_at.type), sa.literal(before.id))
            )
            query = query.order_by(tasks.c.created_at.asc(), tasks.c.id.asc())
        else:
            if after is not None:
                query = query.where(
                    key
                    < sa.tuple_(sa.literal(after.created_at, tasks.c.created_at.type), sa.literal(after.id))
                )
            query = query.order_by(tasks.c.created_at.desc(), tasks.c.id.desc())
        async with self._tx() as conn:
            rows = [_task(r) for r in (await conn.execute(query.limit(limit + 1))).all()]
        more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, more

    async def claim_task(self, worker_id: str, lease_seconds: float) -> TaskRow | None:
        """Atomically take the oldest pending task, or a running one whose lease has expired."""
        now = utcnow()
        candidate = (
            sa.select(tasks.c.id)
            .where(
                sa.or_(
                    tasks.c.status == "pending",
                    sa.and_(tasks.c.status == "running", tasks.c.lease_expires_at < now),
                )
            )
            .order_by(tasks.c.created_at)
            .limit(1)
        )
        if self.is_postgres:
            candidate = candidate.with_for_update(skip_locked=True)
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    tasks.update()
                    .where(tasks.c.id == candidate.scalar_subquery())
                    .values(
                        status="running",
                        lease_owner=worker_id,
                        lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                        attempts=tasks.c.attempts + 1,
                        updated_at=now,
                    )
                    .returning(*tasks.c)
                )
            ).first()
        return _task(row) if row else None

    async def renew_lease(self, task_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend a held lease; False when the lease was lost to another worker."""
        now = utcnow()
        async with self._tx() as conn:
            result = await conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == "running", tasks.c.lease_owner == worker_id)
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            )
        return bool(result.rowcount)

    async def release_task(self, task_id: str, worker_id: str) -> bool:
        """Give a running task back to the queue (graceful shutdown)."""
        async with self._tx() as conn:
            result = await conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status == "running", tasks.c.lease_owner == worker_id)
                .values(status="pending", lease_owner=None, lease_expires_at=None, updated_at=utcnow())
            )
            if result.rowcount:
                await self._notify(conn, TASKS_CHANNEL)
        return bool(result.rowcount)

    async def finish_task(
        self,
        task_id: str,
        worker_id: str,
        outcome: Outcome,
        delivery_id: Callable[[], str] = lambda: f"msg_{uuid.uuid4().hex}",
    ) -> TaskRow | None:
        """Record the outcome, settle credits and queue the webhook, all in one transaction.

        Returns None (and changes nothing) when ``worker_id`` no longer holds the task's lease.
        """
        now = utcnow()
        async with self._tx() as conn:
            current = (
                await conn.execute(
                    sa.select(tasks.c.account_id, tasks.c.credits_reserved).where(
                        tasks.c.id == task_id, tasks.c.status == "running", tasks.c.lease_owner == worker_id
                    )
                )
            ).first()
            if current is None:
                return None
            reserved = int(current.credits_reserved)
            account_q = sa.select(accounts.c.balance).where(accounts.c.id == current.account_id)
            if self.is_postgres:
                account_q = account_q.with_for_update()
            balance = int((await conn.execute(account_q)).scalar_one())
            # A cost above the reservation (an input estimate that fell short) is charged only as far as
            # the balance allows: the balance never goes negative and credits_used stays what was charged.
            charged = min(max(outcome.cost, 0), reserved + balance)
            refund = reserved - charged
            new_balance = balance + refund
            await conn.execute(
                accounts.update().where(accounts.c.id == current.account_id).values(balance=new_balance)
            )
            await conn.execute(
                ledger.insert().values(
                    account_id=current.account_id,
                    task_id=task_id,
                    kind="settle" if outcome.status == "done" else "release",
                    amount=refund,
                    balance_after=new_balance,
                    created_at=now,
                )
            )
            row = (
                await conn.execute(
                    tasks.update()
                    .where(tasks.c.id == task_id)
                    .values(
                        status=outcome.status,
                        response_text=outcome.response_text,
                        response_function_calls=outcome.function_calls,
                        failed_reason=outcome.failed_reason,
                        finish_reason=outcome.finish_reason,
                        input_tokens=outcome.input_tokens,
                        output_tokens=outcome.output_tokens,
                        credits_used=charged,
                        lease_owner=None,
                        lease_expires_at=None,
                        updated_at=now,
                    )
                    .returning(*tasks.c)
                )
            ).one()
            task = _task(row)
            if task.webhook_url:
                await conn.execute(
                    webhook_deliveries.insert().values(
                        id=delivery_id(),
                        task_id=task.id,
                        account_id=task.account_id,
                        url=task.webhook_url,
                        payload=json.dumps(webhook_payload(task), separators=(",", ":")),
                        status="pending",
                        attempt_count=0,
                        next_attempt_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
                await self._notify(conn, DELIVERIES_CHANNEL)
        if task.webhook_url:
            self._deliveries_queued()
        return task

    async def task_counts(self) -> dict[str, int]:
        async with self._tx() as conn:
            rows = (
                await conn.execute(sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status))
            ).all()
        return {str(status): int(count) for status, count in rows}

    # ---- webhook deliveries (the outbox) --------------------------------------------------------

    async def queue_delivery(self, task: TaskRow, url: str) -> str:
        """Queue a new delivery of a finished task's payload (redelivery)."""
        now = utcnow()
        delivery = f"msg_{uuid.uuid4().hex}"
        async with self._tx() as conn:
            await conn.execute(
                webhook_deliveries.insert().values(
                    id=delivery,
                    task_id=task.id,
                    account_id=task.account_id,
                    url=url,
                    payload=json.dumps(webhook_payload(task), separators=(",", ":")),
                    status="pending",
                    attempt_count=0,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
            await self._notify(conn, DELIVERIES_CHANNEL)
        self._deliveries_queued()
        return delivery

    async def deliveries_for_task(self, task_id: str) -> list[dict[str, Any]]:
        async with self._tx() as conn:
            deliveries = (
                await conn.execute(
                    sa.select(webhook_deliveries)
                    .where(webhook_deliveries.c.task_id == task_id)
                    .order_by(webhook_deliveries.c.created_at)
                )
            ).all()
            attempts = (
                await conn.execute(
                    sa.select(webhook_attempts)
                    .where(webhook_attempts.c.delivery_id.in_([d.id for d in deliveries]))
                    .order_by(webhook_attempts.c.id)
                )
            ).all()
        out = []
        for d in deliveries:
            out.append(
                {
                    **{
                        k: v
                        for k, v in d._mapping.items()
                        if k not in ("payload", "locked_by", "locked_until")
                    },
                    "attempts": [dict(a._mapping) for a in attempts if a.delivery_id == d.id],
                }
            )
        return out

    # ---- webhook delivery sender (claims, attempts, outcomes) -----------------------------------

    def _deliveries_queued(self) -> None:
        for listener in self.delivery_listeners:
            listener()

    async def claim_deliveries(self, worker_id: str, lease_seconds: float, limit: int) -> list[DeliveryRow]:
        """Lock up to ``limit`` due pending deliveries for ``worker_id``; a lock expires after the lease.

        Only unlocked (or expired) rows are taken, so at most one attempt per delivery is in flight.
        """
        now = utcnow()
        d = webhook_deliveries
        due = sa.and_(
            d.c.status == "pending",
            d.c.next_attempt_at <= now,
            sa.or_(d.c.locked_until.is_(None), d.c.locked_until < now),
        )
        candidates = sa.select(d.c.id).where(due).order_by(d.c.next_attempt_at, d.c.id).limit(limit)
        if self.is_postgres:
            candidates = candidates.with_for_update(skip_locked=True)
        async with self._tx() as conn:
            rows = (
                await conn.execute(
                    d.update()
                    .where(d.c.id.in_(candidates), due)
                    .values(locked_by=worker_id, locked_until=now + dt.timedelta(seconds=lease_seconds))
                    .returning(*d.c)
                )
            ).all()
        claimed = [DeliveryRow(**r._mapping) for r in rows]
        return sorted(claimed, key=lambda r: (r.next_attempt_at or now, r.id))

    async def record_attempt(self, delivery_id: str, worker_id: str, attempt: AttemptRecord) -> bool:
        """Log an attempt and move the delivery on (next try, delivered or failed), releasing its lock.

        The attempt is always logged; the delivery itself changes only while ``worker_id`` holds its lock
        (False otherwise: the lock expired and another sender took the delivery over).
        """
        d = webhook_deliveries
        async with self._tx() as conn:
            await conn.execute(
                webhook_attempts.insert().values(
                    delivery_id=delivery_id,
                    attempted_at=attempt.attempted_at,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    duration_ms=attempt.duration_ms,
                    next_attempt_at=attempt.next_attempt_at,
                )
            )
            result = await conn.execute(
                d.update()
                .where(d.c.id == delivery_id, d.c.status == "pending", d.c.locked_by == worker_id)
                .values(
                    status=attempt.outcome,
                    attempt_count=d.c.attempt_count + 1,
                    next_attempt_at=attempt.next_attempt_at,
                    locked_by=None,
                    locked_until=None,
                    updated_at=utcnow(),
                )
            )
        return bool(result.rowcount)

    async def release_deliveries(self, worker_id: str) -> int:
        """Unlock every delivery ``worker_id`` holds (shutdown), so another sender can retry it at once."""
        d = webhook_deliveries
        async with self._tx() as conn:
            result = await conn.execute(
                d.update()
                .where(d.c.locked_by == worker_id, d.c.status == "pending")
                .values(locked_by=None, locked_until=None)
            )
        return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class DeliveryRow:
    id: str
    task_id: str
    account_id: int
    url: str
    payload: str
    status: str
    attempt_count: int
    next_attempt_at: dt.datetime | None
    locked_by: str | None
    locked_until: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One delivery attempt and what it leads to: ``outcome`` is the delivery's status afterwards."""

    attempted_at: dt.datetime
    status_code: int | None
    error: str | None
    duration_ms: float
    outcome: str  # pending | delivered | failed
    next_attempt_at: dt.datetime | None
