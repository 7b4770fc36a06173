"""The store: every persistence operation of the service, behind one object.

Credits move only here, always as a conditional update of the balance plus a ledger row in the same
transaction, so concurrent requests cannot overdraw an account and the ledger always sums to the balance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from textgen.errors import AccountDisabled, InsufficientCredits, NotFound, StorageUnavailable
from textgen.notify import DELIVERIES_CHANNEL, TASKS_CHANNEL
from textgen.storage.engine import sqlite_sync_engine
from textgen.storage.tables import (
    accounts,
    api_keys,
    ledger,
    tasks,
    webhook_attempts,
    webhook_deliveries,
)

T = TypeVar("T")

TERMINAL = ("done", "failed")


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


# Statements of the request path, built once: constructing and cache-keying them per call costs more than
# executing them on SQLite.
_b = sa.bindparam
_ACCOUNT_BY_API_ID = sa.select(accounts).where(accounts.c.api_id == _b("api_id"))
_ACCOUNT_BY_ID = sa.select(accounts).where(accounts.c.id == _b("account_id"))
_RESERVE = (
    accounts.update()
    .where(
        accounts.c.id == _b("account_id"),
        accounts.c.balance >= _b("amount"),
        accounts.c.disabled == sa.false(),
    )
    .values(balance=accounts.c.balance - _b("amount"))
    .returning(accounts.c.balance)
)
_REFUND = (
    accounts.update()
    .where(accounts.c.id == _b("account_id"))
    .values(balance=accounts.c.balance + _b("amount"))
    .returning(accounts.c.balance)
)
_INSERT_TASK = tasks.insert()
_INSERT_LEDGER = ledger.insert()
_INSERT_DELIVERY = webhook_deliveries.insert()
_TASK_BY_ID = sa.select(tasks).where(tasks.c.id == _b("task_id"))
_TASK_OF_ACCOUNT = sa.select(tasks).where(tasks.c.id == _b("task_id"), tasks.c.account_id == _b("account_id"))
_HELD = sa.and_(
    tasks.c.id == _b("task_id"), tasks.c.status == "running", tasks.c.lease_owner == _b("worker_id")
)
_RENEW = tasks.update().where(_HELD).values(lease_expires_at=_b("expires"))
_RELEASE = (
    tasks.update()
    .where(_HELD)
    .values(status="pending", lease_owner=None, lease_expires_at=None, updated_at=_b("now"))
)
# Settles at most the reservation here; a cost above it (rare: the input estimate fell short) is charged
# afterwards as far as the balance allows.
_FINISH = (
    tasks.update()
    .where(_HELD)
    .values(
        status=_b("status"),
        response_text=_b("response_text"),
        response_function_calls=_b("response_function_calls", type_=tasks.c.response_function_calls.type),
        failed_reason=_b("failed_reason"),
        finish_reason=_b("finish_reason"),
        input_tokens=_b("input_tokens"),
        output_tokens=_b("output_tokens"),
        credits_used=sa.case(
            (tasks.c.credits_reserved < _b("cost"), tasks.c.credits_reserved), else_=_b("cost")
        ),
        lease_owner=None,
        lease_expires_at=None,
        updated_at=_b("now"),
    )
    .returning(*tasks.c)
)


def _claim_statement(postgres: bool) -> sa.Update:
    candidate = (
        sa.select(tasks.c.id)
        .where(
            sa.or_(
                tasks.c.status == "pending",
                sa.and_(tasks.c.status == "running", tasks.c.lease_expires_at < _b("now")),
            )
        )
        .order_by(tasks.c.created_at)
        .limit(1)
    )
    if postgres:
        candidate = candidate.with_for_update(skip_locked=True)
    return (
        tasks.update()
        .where(tasks.c.id == candidate.scalar_subquery())
        .values(
            status="running",
            lease_owner=_b("worker_id"),
            lease_expires_at=_b("expires"),
            attempts=tasks.c.attempts + 1,
            updated_at=_b("now"),
        )
        .returning(*tasks.c)
    )


_TASK_DEPTH = (
    sa.select(tasks.c.status, sa.func.count())
    .where(tasks.c.status.in_(["pending", "running"]))
    .group_by(tasks.c.status)
)
_DELIVERY_BACKLOG = (
    sa.select(sa.func.count()).select_from(webhook_deliveries).where(webhook_deliveries.c.status == "pending")
)


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
    """Each operation is one transaction, written as a function of a (synchronous) connection.

    On SQLite the function runs on one dedicated thread with the standard library driver: a transaction is
    one hop off the event loop, and every statement of the process is serialised through one connection.
    On PostgreSQL it runs on the async pool through ``AsyncConnection.run_sync``.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_postgres = engine.dialect.name == "postgresql"
        self._sqlite = None if self.is_postgres else sqlite_sync_engine(engine)
        self._thread = (
            None if self.is_postgres else ThreadPoolExecutor(1, thread_name_prefix="textgen-sqlite")
        )
        self._claim = _claim_statement(self.is_postgres)
        # Called after a transaction that queued a webhook delivery commits (wakes the in-process sender).
        self.delivery_listeners: list[Callable[[], None]] = []
        # A webhook sender runs in this process: it is woken through delivery_listeners, and the senders of
        # other processes find what it cannot take at once by polling. Otherwise a NOTIFY wakes them all.
        self.delivers_locally = False

    async def aclose(self) -> None:
        if self._sqlite is not None and self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._sqlite.dispose)
            self._thread.shutdown(wait=False)
        await self.engine.dispose()

    async def _run(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a transaction; driver failures leave as StorageUnavailable, never raw."""
        try:
            if self._sqlite is not None:
                return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_sqlite, work)
            async with self.engine.begin() as conn:
                return await conn.run_sync(work)
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError):
            raise
        except (sa_exc.DBAPIError, sa_exc.TimeoutError, OSError, TimeoutError) as exc:
            raise StorageUnavailable(f"database unavailable: {type(exc).__name__}") from exc

    def _in_sqlite(self, work: Callable[[Connection], T]) -> T:
        assert self._sqlite is not None
        with self._sqlite.begin() as conn:
            return work(conn)

    def _notify(self, conn: Connection, channel: str) -> None:
        """On PostgreSQL, wake listeners in every process once this transaction commits."""
        if self.is_postgres:
            conn.execute(sa.select(sa.func.pg_notify(channel, "")))

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute(sa.text("SELECT 1")))

    # ---- accounts -------------------------------------------------------------------------------

    async def create_account(
        self,
        *,
        api_id: str,
        key_id: str,
        key_hash: str,
        key_prefix: str,
        name: str,
        credits: int,
        rate_limit: int,
        webhook_secret: str,
    ) -> AccountRow:
        """Create an account with its first API key and record its opening grant in the ledger."""
        now = utcnow()

        def work(conn: Connection) -> AccountRow:
            row = conn.execute(
                accounts.insert()
                .values(
                    api_id=api_id,
                    name=name,
                    balance=credits,
                    rate_limit=rate_limit,
                    webhook_secret=webhook_secret,
                    created_at=now,
                )
                .returning(*accounts.c)
            ).one()
            conn.execute(
                api_keys.insert().values(
                    id=key_id, account_id=row.id, key_hash=key_hash, prefix=key_prefix, created_at=now
                )
            )
            conn.execute(
                _INSERT_LEDGER,
                {
                    "account_id": row.id,
                    "kind": "grant",
                    "amount": credits,
                    "balance_after": credits,
                    "created_at": now,
                },
            )
            return _account(row)

        return await self._run(work)

    async def count_accounts(self) -> int:
        return await self._run(
            lambda conn: int(conn.execute(sa.select(sa.func.count()).select_from(accounts)).scalar_one())
        )

    async def account_by_api_id(self, api_id: str) -> AccountRow | None:
        row = await self._run(lambda conn: conn.execute(_ACCOUNT_BY_API_ID, {"api_id": api_id}).first())
        return _account(row) if row else None

    async def account_by_id(self, account_id: int) -> AccountRow:
        row = await self._run(lambda conn: conn.execute(_ACCOUNT_BY_ID, {"account_id": account_id}).one())
        return _account(row)

    async def grant(self, api_id: str, amount: int) -> AccountRow:
        """Add (or, negative, remove) credits; the balance never goes below zero."""

        def work(conn: Connection) -> AccountRow:
            row = conn.execute(
                accounts.update()
                .where(accounts.c.api_id == api_id, accounts.c.balance + amount >= 0)
                .values(balance=accounts.c.balance + amount)
                .returning(*accounts.c)
            ).first()
            if row is None:
                if conn.execute(sa.select(accounts.c.id).where(accounts.c.api_id == api_id)).first():
                    raise InsufficientCredits("the balance cannot go below zero")
                raise NotFound(f"no account with api_id {api_id!r}")
            conn.execute(
                _INSERT_LEDGER,
                {
                    "account_id": row.id,
                    "kind": "grant",
                    "amount": amount,
                    "balance_after": row.balance,
                    "created_at": utcnow(),
                },
            )
            return _account(row)

        return await self._run(work)

    async def set_rate_limit(self, api_id: str, rpm: int) -> None:
        await self._run(
            lambda conn: conn.execute(
                accounts.update().where(accounts.c.api_id == api_id).values(rate_limit=rpm)
            )
        )

    async def rotate_webhook_secret(self, api_id: str, new_secret: str, grace: dt.timedelta) -> AccountRow:
        """Make ``new_secret`` current; the old one keeps signing until the grace period ends."""
        row = await self._run(
            lambda conn: conn.execute(
                accounts.update()
                .where(accounts.c.api_id == api_id)
                .values(
                    webhook_secret_previous=accounts.c.webhook_secret,
                    webhook_secret_previous_until=utcnow() + grace,
                    webhook_secret=new_secret,
                )
                .returning(*accounts.c)
            ).first()
        )
        if row is None:
            raise NotFound(f"no account with api_id {api_id!r}")
        return _account(row)

    async def ledger_summary(self, account_id: int) -> LedgerSummary:
        def work(conn: Connection) -> LedgerSummary:
            balance = conn.execute(
                sa.select(accounts.c.balance).where(accounts.c.id == account_id)
            ).scalar_one()
            total = conn.execute(
                sa.select(sa.func.coalesce(sa.func.sum(ledger.c.amount), 0)).where(
                    ledger.c.account_id == account_id
                )
            ).scalar_one()
            return LedgerSummary(balance=int(balance), ledger_sum=int(total))

        return await self._run(work)

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
        running = lease_owner is not None
        task = TaskRow(
            id=str(uuid.uuid4()),
            account_id=account_id,
            model_name=model_name,
            mode=mode,
            status="running" if running else "pending",
            request=request,
            webhook_url=webhook_url,
            response_text="",
            response_function_calls=[],
            failed_reason="",
            finish_reason=None,
            input_tokens=0,
            output_tokens=0,
            credits_reserved=reserve,
            credits_used=0,
            lease_owner=lease_owner,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds) if running else None,
            attempts=1 if running else 0,
            created_at=now,
            updated_at=now,
        )

        def work(conn: Connection) -> None:
            balance_after = conn.execute(_RESERVE, {"account_id": account_id, "amount": reserve}).scalar()
            if balance_after is None:
                if conn.execute(_ACCOUNT_BY_ID, {"account_id": account_id}).one().disabled:
                    raise AccountDisabled("this account is disabled; ask the operator to enable it")
                raise InsufficientCredits(
                    f"not enough credits: this request may cost up to {reserve / 1_000_000:g} credits"
                )
            conn.execute(_INSERT_TASK, _task_values(task))
            conn.execute(
                _INSERT_LEDGER,
                {
                    "account_id": account_id,
                    "task_id": task.id,
                    "kind": "reserve",
                    "amount": -reserve,
                    "balance_after": balance_after,
                    "created_at": now,
                },
            )
            if not running:
                self._notify(conn, TASKS_CHANNEL)

        await self._run(work)
        return task

    async def get_task(self, task_id: str, account_id: int | None = None) -> TaskRow:
        params: dict[str, Any]
        if account_id is None:
            statement, params = _TASK_BY_ID, {"task_id": task_id}
        else:
            statement, params = _TASK_OF_ACCOUNT, {"task_id": task_id, "account_id": account_id}
        row = await self._run(lambda conn: conn.execute(statement, params).first())
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
        final = query.limit(limit + 1)
        rows = await self._run(lambda conn: [_task(r) for r in conn.execute(final).all()])
        more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, more

    async def claim_task(self, worker_id: str, lease_seconds: float) -> TaskRow | None:
        """Atomically take the oldest pending task, or a running one whose lease has expired."""
        now = utcnow()
        params = {"now": now, "worker_id": worker_id, "expires": now + dt.timedelta(seconds=lease_seconds)}
        row = await self._run(lambda conn: conn.execute(self._claim, params).first())
        return _task(row) if row else None

    async def renew_lease(self, task_id: str, worker_id: str, lease_seconds: float) -> bool:
        """Extend a held lease; False when the lease was lost to another worker."""
        params = {
            "task_id": task_id,
            "worker_id": worker_id,
            "expires": utcnow() + dt.timedelta(seconds=lease_seconds),
        }
        return await self._run(lambda conn: bool(conn.execute(_RENEW, params).rowcount))

    async def release_task(self, task_id: str, worker_id: str) -> bool:
        """Give a running task back to the queue (graceful shutdown)."""

        def work(conn: Connection) -> bool:
            result = conn.execute(_RELEASE, {"task_id": task_id, "worker_id": worker_id, "now": utcnow()})
            if result.rowcount:
                self._notify(conn, TASKS_CHANNEL)
            return bool(result.rowcount)

        return await self._run(work)

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
        cost = max(outcome.cost, 0)

        def work(conn: Connection) -> TaskRow | None:
            row = conn.execute(
                _FINISH,
                {
                    "task_id": task_id,
                    "worker_id": worker_id,
                    "status": outcome.status,
                    "response_text": outcome.response_text,
                    "response_function_calls": outcome.function_calls,
                    "failed_reason": outcome.failed_reason,
                    "finish_reason": outcome.finish_reason,
                    "input_tokens": outcome.input_tokens,
                    "output_tokens": outcome.output_tokens,
                    "cost": cost,
                    "now": now,
                },
            ).first()
            if row is None:
                return None
            task = _task(row)
            refund = task.credits_reserved - task.credits_used
            balance = conn.execute(_REFUND, {"account_id": task.account_id, "amount": refund}).scalar_one()
            if cost > task.credits_used:
                # Charged only as far as the balance allows: it never goes negative, and credits_used stays
                # what was actually charged.
                extra = min(cost - task.credits_used, int(balance))
                if extra > 0:
                    balance = conn.execute(
                        _REFUND, {"account_id": task.account_id, "amount": -extra}
                    ).scalar_one()
                    conn.execute(
                        tasks.update()
                        .where(tasks.c.id == task_id)
                        .values(credits_used=task.credits_used + extra)
                    )
                    task = dataclasses.replace(task, credits_used=task.credits_used + extra)
                    refund -= extra
            conn.execute(
                _INSERT_LEDGER,
                {
                    "account_id": task.account_id,
                    "task_id": task_id,
                    "kind": "settle" if outcome.status == "done" else "release",
                    "amount": refund,
                    "balance_after": balance,
                    "created_at": now,
                },
            )
            if task.webhook_url:
                conn.execute(
                    _INSERT_DELIVERY,
                    {
                        "id": delivery_id(),
                        "task_id": task.id,
                        "account_id": task.account_id,
                        "url": task.webhook_url,
                        "payload": json.dumps(webhook_payload(task), separators=(",", ":")),
                        "status": "pending",
                        "attempt_count": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                        "updated_at": now,
                    },
                )
                if not self.delivers_locally:
                    self._notify(conn, DELIVERIES_CHANNEL)
            return task

        task = await self._run(work)
        if task is not None and task.webhook_url:
            self._deliveries_queued()
        return task

    async def task_counts(self) -> dict[str, int]:
        rows = await self._run(
            lambda conn: conn.execute(
                sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
            ).all()
        )
        return {str(status): int(count) for status, count in rows}

    async def queue_depth(self) -> tuple[dict[str, int], int]:
        """Tasks pending and running, by status, and webhook deliveries pending (counts on status indexes)."""

        def work(conn: Connection) -> tuple[dict[str, int], int]:
            rows = conn.execute(_TASK_DEPTH).all()
            backlog = int(conn.execute(_DELIVERY_BACKLOG).scalar_one())
            return {str(status): int(count) for status, count in rows}, backlog

        return await self._run(work)

    # ---- webhook deliveries (the outbox) --------------------------------------------------------

    async def queue_delivery(self, task: TaskRow, url: str) -> str:
        """Queue a new delivery of a finished task's payload (redelivery)."""
        now = utcnow()
        delivery = f"msg_{uuid.uuid4().hex}"

        def work(conn: Connection) -> None:
            conn.execute(
                _INSERT_DELIVERY,
                {
                    "id": delivery,
                    "task_id": task.id,
                    "account_id": task.account_id,
                    "url": url,
                    "payload": json.dumps(webhook_payload(task), separators=(",", ":")),
                    "status": "pending",
                    "attempt_count": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                    "updated_at": now,
                },
            )
            if not self.delivers_locally:
                self._notify(conn, DELIVERIES_CHANNEL)

        await self._run(work)
        self._deliveries_queued()
        return delivery

    async def deliveries_for_task(self, task_id: str) -> list[dict[str, Any]]:
        def work(conn: Connection) -> tuple[list[Any], list[Any]]:
            deliveries = conn.execute(
                sa.select(webhook_deliveries)
                .where(webhook_deliveries.c.task_id == task_id)
                .order_by(webhook_deliveries.c.created_at)
            ).all()
            attempts = conn.execute(
                sa.select(webhook_attempts)
                .where(webhook_attempts.c.delivery_id.in_([d.id for d in deliveries]))
                .order_by(webhook_attempts.c.id)
            ).all()
            return list(deliveries), list(attempts)

        deliveries, attempts = await self._run(work)
        hidden = ("payload", "locked_by", "locked_until")
        return [
            {
                **{k: v for k, v in d._mapping.items() if k not in hidden},
                "attempts": [dict(a._mapping) for a in attempts if a.delivery_id == d.id],
            }
            for d in deliveries
        ]

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
        statement = (
            d.update()
            .where(d.c.id.in_(candidates), due)
            .values(locked_by=worker_id, locked_until=now + dt.timedelta(seconds=lease_seconds))
            .returning(*d.c)
        )
        rows = await self._run(lambda conn: conn.execute(statement).all())
        claimed = [DeliveryRow(**r._mapping) for r in rows]
        return sorted(claimed, key=lambda r: (r.next_attempt_at or now, r.id))

    async def record_attempt(self, delivery_id: str, worker_id: str, attempt: AttemptRecord) -> bool:
        """Log an attempt and move the delivery on (next try, delivered or failed), releasing its lock.

        The attempt is always logged; the delivery itself changes only while ``worker_id`` holds its lock
        (False otherwise: the lock expired and another sender took the delivery over).
        """
        d = webhook_deliveries

        def work(conn: Connection) -> bool:
            conn.execute(
                webhook_attempts.insert().values(
                    delivery_id=delivery_id,
                    attempted_at=attempt.attempted_at,
                    status_code=attempt.status_code,
                    error=attempt.error,
                    duration_ms=attempt.duration_ms,
                    next_attempt_at=attempt.next_attempt_at,
                )
            )
            result = conn.execute(
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

        return await self._run(work)

    async def release_deliveries(self, worker_id: str) -> int:
        """Unlock every delivery ``worker_id`` holds (shutdown), so another sender can retry it at once."""
        d = webhook_deliveries
        statement = (
            d.update()
            .where(d.c.locked_by == worker_id, d.c.status == "pending")
            .values(locked_by=None, locked_until=None)
        )
        return await self._run(lambda conn: int(conn.execute(statement).rowcount))


def _task_values(task: TaskRow) -> dict[str, Any]:
    return {name: getattr(task, name) for name in TaskRow.__dataclass_fields__}


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
