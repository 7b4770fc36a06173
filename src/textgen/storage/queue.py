"""The task queue: tasks created with their reservation, claimed under leases, and finished with settlement."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from textgen.catalog import from_micro
from textgen.credits import needs_balance, settle
from textgen.errors import AccountDisabled, InsufficientCredits, NotFound
from textgen.notify import CANCEL_CHANNEL, DELIVERIES_CHANNEL, TASKS_CHANNEL
from textgen.states import Cancellation, DeliveryStatus, TaskMode, TaskStatus
from textgen.storage.accounts import ACCOUNT_BY_ID, INSERT_LEDGER
from textgen.storage.database import Database
from textgen.storage.idempotency import attach_task
from textgen.storage.outbox import insert_delivery, new_delivery_id
from textgen.storage.rows import Cursor, Outcome, Renewal, TaskRow, task_row, task_values, utcnow
from textgen.storage.tables import accounts, tasks, webhook_deliveries

# Statements of the request path, built once: constructing and cache-keying them per call costs more than
# executing them on SQLite.
_b = sa.bindparam
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
_ADD = (
    accounts.update()
    .where(accounts.c.id == _b("account_id"))
    .values(balance=accounts.c.balance + _b("amount"))
    .returning(accounts.c.balance)
)
_INSERT_TASK = tasks.insert()
_TASK_BY_ID = sa.select(tasks).where(tasks.c.id == _b("task_id"))
_TASK_OF_ACCOUNT = sa.select(tasks).where(tasks.c.id == _b("task_id"), tasks.c.account_id == _b("account_id"))
_HELD = sa.and_(
    tasks.c.id == _b("task_id"),
    tasks.c.status == TaskStatus.RUNNING,
    tasks.c.lease_owner == _b("worker_id"),
)
_RENEW = (
    tasks.update().where(_HELD).values(lease_expires_at=_b("expires")).returning(tasks.c.cancel_requested)
)
_RELEASE = (
    tasks.update()
    .where(_HELD)
    .values(status=TaskStatus.PENDING, lease_owner=None, lease_expires_at=None, updated_at=_b("now"))
)


def _record_statement(condition: sa.ColumnElement[bool]) -> sa.Update:
    """Record an outcome on the task matching ``condition``; the settlement's charge comes as ``charged``."""
    return (
        tasks.update()
        .where(condition)
        .values(
            status=_b("status"),
            response_text=_b("response_text"),
            response_function_calls=_b("response_function_calls", type_=tasks.c.response_function_calls.type),
            failed_reason=_b("failed_reason"),
            finish_reason=_b("finish_reason"),
            input_tokens=_b("input_tokens"),
            output_tokens=_b("output_tokens"),
            credits_used=_b("charged"),
            lease_owner=None,
            lease_expires_at=None,
            updated_at=_b("now"),
        )
        .returning(*tasks.c)
    )


_FINISH = _record_statement(_HELD)
# A task nobody is running (pending, or running under a lease that has expired) is cancelled at once.
_CANCEL_NOW = _record_statement(
    sa.and_(
        tasks.c.id == _b("task_id"),
        sa.or_(
            tasks.c.status == TaskStatus.PENDING,
            sa.and_(tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at < _b("now")),
        ),
    )
)
_REQUEST_CANCEL = (
    tasks.update()
    .where(tasks.c.id == _b("task_id"), tasks.c.status == TaskStatus.RUNNING)
    .values(cancel_requested=True)
)
_TASK_DEPTH = (
    sa.select(tasks.c.status, sa.func.count())
    .where(tasks.c.status.in_([TaskStatus.PENDING, TaskStatus.RUNNING]))
    .group_by(tasks.c.status)
)
_DELIVERY_BACKLOG = (
    sa.select(sa.func.count())
    .select_from(webhook_deliveries)
    .where(webhook_deliveries.c.status == DeliveryStatus.PENDING)
)


def _claim_statement(postgres: bool) -> sa.Update:
    candidate = (
        sa.select(tasks.c.id)
        .where(
            sa.or_(
                tasks.c.status == TaskStatus.PENDING,
                sa.and_(tasks.c.status == TaskStatus.RUNNING, tasks.c.lease_expires_at < _b("now")),
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
            status=TaskStatus.RUNNING,
            lease_owner=_b("worker_id"),
            lease_expires_at=_b("expires"),
            attempts=tasks.c.attempts + 1,
            updated_at=_b("now"),
        )
        .returning(*tasks.c)
    )


class TaskQueue:
    """``payload`` renders a finished task as its webhook body (the webhooks package owns that format)."""

    def __init__(self, db: Database, payload: Callable[[TaskRow], str]) -> None:
        self.db = db
        self.payload = payload
        self._claim = _claim_statement(db.is_postgres)
        lock = sa.select(accounts.c.balance).where(accounts.c.id == _b("account_id"))
        self._balance = lock.with_for_update() if db.is_postgres else lock
        self._task_for_update = _TASK_OF_ACCOUNT.with_for_update() if db.is_postgres else _TASK_OF_ACCOUNT

    async def create(
        self,
        *,
        account_id: int,
        model_name: str,
        mode: TaskMode,
        request: dict[str, Any],
        webhook_url: str | None,
        reserve: int,
        lease_owner: str | None = None,
        lease_seconds: float = 0.0,
        notify: bool = False,
        idempotency_key: str | None = None,
    ) -> TaskRow:
        """Reserve ``reserve`` micro-credits and insert the task, atomically; 402 if the balance is short.

        With ``lease_owner`` the task starts running and leased to the caller (sync and stream modes).
        ``notify`` wakes the workers of other processes once the task is committed.
        """
        now = utcnow()
        running = lease_owner is not None
        task = TaskRow(
            id=str(uuid.uuid4()),
            account_id=account_id,
            model_name=model_name,
            mode=mode,
            status=TaskStatus.RUNNING if running else TaskStatus.PENDING,
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
                if conn.execute(ACCOUNT_BY_ID, {"account_id": account_id}).one().disabled:
                    raise AccountDisabled("this account is disabled; ask the operator to enable it")
                raise InsufficientCredits(
                    f"not enough credits: this request may cost up to {from_micro(reserve):g} credits"
                )
            conn.execute(_INSERT_TASK, task_values(task))
            conn.execute(
                INSERT_LEDGER,
                {
                    "account_id": account_id,
                    "task_id": task.id,
                    "kind": "reserve",
                    "amount": -reserve,
                    "balance_after": balance_after,
                    "created_at": now,
                },
            )
            if idempotency_key is not None:
                attach_task(conn, account_id, idempotency_key, task.id)
            if notify:
                self.db.notify(conn, TASKS_CHANNEL)

        await self.db.run(work)
        return task

    async def get(self, task_id: str, account_id: int | None = None) -> TaskRow:
        params: dict[str, Any]
        if account_id is None:
            statement, params = _TASK_BY_ID, {"task_id": task_id}
        else:
            statement, params = _TASK_OF_ACCOUNT, {"task_id": task_id, "account_id": account_id}
        row = await self.db.run(lambda conn: conn.execute(statement, params).first())
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return task_row(row)

    async def list(
        self,
        account_id: int,
        *,
        limit: int,
        status: TaskStatus | None = None,
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
        rows = await self.db.run(lambda conn: [task_row(r) for r in conn.execute(final).all()])
        more = len(rows) > limit
        rows = rows[:limit]
        if before is not None:
            rows.reverse()
        return rows, more

    async def claim(self, worker_id: str, lease_seconds: float) -> TaskRow | None:
        """Atomically take the oldest pending task, or a running one whose lease has expired."""
        now = utcnow()
        params = {"now": now, "worker_id": worker_id, "expires": now + dt.timedelta(seconds=lease_seconds)}
        row = await self.db.run(lambda conn: conn.execute(self._claim, params).first())
        return task_row(row) if row else None

    async def renew_lease(self, task_id: str, worker_id: str, lease_seconds: float) -> Renewal:
        """Extend a held lease; false when the lease was lost to another worker. The renewal also says
        whether someone asked to cancel the task."""
        params = {
            "task_id": task_id,
            "worker_id": worker_id,
            "expires": utcnow() + dt.timedelta(seconds=lease_seconds),
        }
        row = await self.db.run(lambda conn: conn.execute(_RENEW, params).first())
        return Renewal(held=row is not None, cancel_requested=bool(row and row.cancel_requested))

    async def release(self, task_id: str, worker_id: str, *, notify: bool = False) -> bool:
        """Give a running task back to the queue (graceful shutdown)."""

        def work(conn: Connection) -> bool:
            result = conn.execute(_RELEASE, {"task_id": task_id, "worker_id": worker_id, "now": utcnow()})
            if result.rowcount and notify:
                self.db.notify(conn, TASKS_CHANNEL)
            return bool(result.rowcount)

        return await self.db.run(work)

    async def finish(
        self, task: TaskRow, worker_id: str, outcome: Outcome, *, notify_delivery: bool = False
    ) -> TaskRow | None:
        """Record the outcome, settle credits and queue the webhook, all in one transaction.

        Returns None (and changes nothing) when ``worker_id`` no longer holds the task's lease.
        ``notify_delivery`` wakes other processes' webhook senders when a delivery is queued.
        """
        params = {"task_id": task.id, "worker_id": worker_id}
        return await self.db.run(
            lambda conn: self._record(conn, _FINISH, params, task, outcome, notify_delivery)
        )

    async def cancel(
        self, task_id: str, account_id: int, outcome: Outcome, *, notify_delivery: bool = False
    ) -> tuple[Cancellation, TaskRow]:
        """Cancel a task of ``account_id``: one nobody runs ends now with ``outcome``; one that runs is asked
        to stop (its runner settles it; on PostgreSQL every process hears of it on the cancel channel)."""
        now = utcnow()
        params = {"task_id": task_id, "account_id": account_id}

        def work(conn: Connection) -> tuple[Cancellation, TaskRow]:
            row = conn.execute(self._task_for_update, params).first()
            if row is None:
                raise NotFound(f"task {task_id} not found")
            task = task_row(row)
            if task.status.finished:
                return Cancellation.FINISHED, task
            if task.status == TaskStatus.PENDING or (
                task.lease_expires_at is not None and task.lease_expires_at < now
            ):
                done = self._record(conn, _CANCEL_NOW, {"task_id": task_id}, task, outcome, notify_delivery)
                assert done is not None  # the row is locked (or the one SQLite writer holds the file)
                return Cancellation.CANCELLED, done
            conn.execute(_REQUEST_CANCEL, {"task_id": task_id})
            self.db.notify(conn, CANCEL_CHANNEL, task_id)
            return Cancellation.REQUESTED, task

        return await self.db.run(work)

    def _record(
        self,
        conn: Connection,
        statement: sa.Update,
        params: dict[str, Any],
        task: TaskRow,
        outcome: Outcome,
        notify_delivery: bool,
    ) -> TaskRow | None:
        """Record ``outcome`` (if ``statement`` matches), settle the reservation, queue the webhook."""
        now = utcnow()
        balance = 0
        if needs_balance(task.credits_reserved, outcome.cost):
            balance = int(conn.execute(self._balance, {"account_id": task.account_id}).scalar_one())
        settlement = settle(task.credits_reserved, outcome.cost, balance)
        row = conn.execute(
            statement,
            {
                **params,
                "status": outcome.status,
                "response_text": outcome.response_text,
                "response_function_calls": outcome.function_calls,
                "failed_reason": outcome.failed_reason,
                "finish_reason": outcome.finish_reason,
                "input_tokens": outcome.input_tokens,
                "output_tokens": outcome.output_tokens,
                "charged": settlement.charged,
                "now": now,
            },
        ).first()
        if row is None:
            return None
        finished = task_row(row)
        balance_after = conn.execute(
            _ADD, {"account_id": task.account_id, "amount": settlement.returned}
        ).scalar_one()
        conn.execute(
            INSERT_LEDGER,
            {
                "account_id": task.account_id,
                "task_id": task.id,
                "kind": "settle" if outcome.status == TaskStatus.DONE else "release",
                "amount": settlement.returned,
                "balance_after": balance_after,
                "created_at": now,
            },
        )
        if finished.webhook_url:
            insert_delivery(
                conn,
                delivery_id=new_delivery_id(),
                task_id=finished.id,
                account_id=finished.account_id,
                url=finished.webhook_url,
                payload=self.payload(finished),
            )
            if notify_delivery:
                self.db.notify(conn, DELIVERIES_CHANNEL)
        return finished

    async def counts(self) -> dict[str, int]:
        rows = await self.db.run(
            lambda conn: conn.execute(
                sa.select(tasks.c.status, sa.func.count()).group_by(tasks.c.status)
            ).all()
        )
        return {str(status): int(count) for status, count in rows}

    async def depth(self) -> tuple[dict[str, int], int]:
        """Tasks pending and running, by status, and webhook deliveries pending (counts on status indexes)."""

        def work(conn: Connection) -> tuple[dict[str, int], int]:
            rows = conn.execute(_TASK_DEPTH).all()
            backlog = int(conn.execute(_DELIVERY_BACKLOG).scalar_one())
            return {str(status): int(count) for status, count in rows}, backlog

        return await self.db.run(work)
